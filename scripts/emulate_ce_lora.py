#!/usr/bin/env python3
"""Lane-level numpy emulator of kernels/cross_entropy.cu and kernels/lora.cu (sqlora).

Every kernel is mirrored line by line: one numpy axis for the blocks of the grid, one for the threads
of a block (lanes and warps are tid % 32, tid / 32), optional trailing axes where one thread runs a
loop with no shared-memory or global write inside (the loop's reads are batched, its arithmetic
still runs in order). Launches copy the Rust wrappers of src/backend/cuda/ops.rs (grid, block, shared
memory 0, argument values). Results are compared with float64 references written from the CPU spec
(src/backend/cpu/{cross_entropy,lora}.rs, src/engine/host.rs, generate::argmax).

Checked besides the values: global out-of-bounds (against the buffer, or the wrapper's slice),
unaligned vector loads, stores of values that are not bf16 into bf16 buffers, unwritten and
multiply-written outputs, writes outside the expected range (LoRA neighbours at `at` offsets, rows
of dh outside the chunk), reads of shared memory not written in the block, and conflicting accesses
(write/write or read/write by different threads) to one shared location between two barriers.

Arithmetic: float32 everywhere; nvcc contracts a*b+c into FMA by default (no -fmad=false in
build.rs), emulated as round_f32(a*b + c) in float64 (exact product); __expf = ex2.approx.ftz of
x*log2(e); bf16 conversions round to nearest even; mma.sync m16n8k16 from the PTX fragment layout.

usage: emulate_ce_lora.py [--inject NAME ...] [--list-injections]
"""
import argparse
import sys
import time
import weakref
from collections import Counter

import numpy as np

F32 = np.float32
INJECT = set()
COVER = Counter()  # which staging paths ran (blocks x slices)
INJECTIONS = {
    "mma_b1": "mma_gemm: b1 fragment read from Bs[col][k+2q] instead of k+2q+8",
    "ce_target": "ce_softmax_grad: targets[i] instead of targets[row0 + i]",
    "rp_nosync": "row_proj: second __syncthreads() dropped (shared race)",
    "ts_tail": "token_sum: the col < U guard dropped on the output",
    "argmax_tie": "argmax_rows: warp tie rule oi > bi (last index wins)",
    "lora_add_r": "lora_add: sum over c < r - 1",
    "stage_a_pad": "stage_a element path: skip the last column of the tile (unwritten shared read)",
}


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------
def bf16_bits(x):
    """__float2bfloat16_rn: float32 -> bf16 bits, round to nearest even, NaN -> 0x7FFF."""
    x = np.ascontiguousarray(x, dtype=F32)
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    r[np.isnan(x)] = 0x7FFF
    return r


def bits_f32(b):
    return (np.asarray(b).astype(np.uint32) << np.uint32(16)).view(F32)


def to_bf16(x):
    """Value of to_bf16(x) held in a float32 (exact)."""
    return bits_f32(bf16_bits(x))


def is_bf16(x):
    x = np.asarray(x, dtype=F32)
    return (x.view(np.uint32) & np.uint32(0xFFFF)) == 0


def fma(a, b, c):
    """fmaf: one rounding (exact float64 product; the sum rounded to f64 then f32)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(F32)


LOG2E = F32(1.4426950408889634)
FLT_MIN = F32(1.1754943508222875e-38)


def expf_fast(x):
    """__expf: ex2.approx.ftz.f32(x * log2(e)) (ex2 taken exact; denormal results flushed)."""
    y = (np.asarray(x, F32) * LOG2E).astype(F32)
    with np.errstate(over="ignore", under="ignore"):
        r = np.exp2(y).astype(F32)
    r[np.abs(r) < FLT_MIN] = F32(0)
    return r


def logf(x):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(np.asarray(x, F32)).astype(F32)


# ----------------------------------------------------------------------------------------------
# Launch, global and shared memory
# ----------------------------------------------------------------------------------------------
class Launch:
    """One kernel launch: B blocks (blockIdx.x fastest) of T threads, vectorised [B, T]."""

    def __init__(self, name, grid, block, shared_bytes=0):
        gx, gy, gz = grid
        assert shared_bytes == 0
        self.name, self.grid, self.T = name, grid, block
        self.B = gx * gy * gz
        bid = np.arange(self.B)
        self.bx = (bid % gx)[:, None]
        self.by = (bid // gx % gy)[:, None]
        self.tid = np.arange(block)[None, :]
        self.gtid = bid[:, None] * block + self.tid  # a global thread id, for hazard tracking
        self.errors = Counter()
        self.smems = []
        self.static_smem = 0

    def err(self, msg, n=1):
        if n:
            self.errors[msg] += int(n)

    def full(self, mask=True):
        return np.broadcast_to(np.asarray(mask), (self.B, self.T)).copy()

    def sync(self):
        for s in self.smems:
            s.sync()

    def smem(self, name, shape, dtype=F32, esize=4):
        s = Smem(self, name, shape, dtype)
        self.smems.append(s)
        self.static_smem += int(np.prod(shape)) * esize
        return s

    def strided(self, n, mask=True):
        """for (int i = threadIdx.x; i < n; i += blockDim.x): (i, active) per iteration."""
        it = 0
        while it * self.T < n:
            i = self.tid + it * self.T
            yield np.broadcast_to(i, (self.B, self.T)), self.full(mask) & (i < n)
            it += 1


def _expand(a, nd):
    a = np.asarray(a)
    return a.reshape(a.shape + (1,) * (nd - a.ndim))


ALL_BUFS = weakref.WeakSet()  # every allocation: write tracking restarts at each launch


class Buf:
    """A device allocation (flat). kind: bf16 (values held in float32), f32, i32."""

    def __init__(self, name, data, kind):
        self.name, self.kind = name, kind
        dt = np.int32 if kind == "i32" else F32
        self.data = np.array(data, dtype=dt).ravel().copy()
        if kind == "bf16":
            assert is_bf16(self.data).all() or np.isnan(self.data).any(), name
        self.esize = 2 if kind == "bf16" else 4
        self.begin()
        ALL_BUFS.add(self)

    def begin(self):
        self.writer = np.full(self.data.size, -1, np.int64)
        self.wcount = np.zeros(self.data.size, np.int32)

    def ptr(self, lo=0, hi=None):
        return Ptr(self, lo, lo, self.data.size if hi is None else hi)


class Ptr:
    """A device pointer: buffer + element offset, valid over the view [lo, hi) (a wrapper's slice)."""

    def __init__(self, buf, off, lo, hi):
        self.buf, self.off, self.lo, self.hi = buf, off, lo, hi

    def __add__(self, k):
        return Ptr(self.buf, self.off + int(k), self.lo, self.hi)

    def _idx(self, L, idx, mask, what, width=1):
        idx = np.asarray(idx, np.int64) + self.off
        shape = np.broadcast_shapes(idx.shape, np.shape(mask))
        idx = np.broadcast_to(idx, shape)
        mask = np.broadcast_to(mask, shape)
        sel = idx[mask]
        bad = (sel < self.lo) | (sel + width > self.hi)
        L.err(f"{what} out of bounds of {self.buf.name}[{self.lo}:{self.hi}]", bad.sum())
        return idx, mask, np.clip(sel, 0, self.buf.data.size - 1)

    def ld(self, L, idx, mask, width=1):
        """Scalar loads (width 1) or `width`-element vector loads (16 bytes: alignment checked)."""
        nd = max(np.ndim(idx), np.ndim(mask), 2)
        gt = _expand(L.gtid, nd)
        idx, mask, sel = self._idx(L, idx, mask, "global read", width)
        if width > 1:
            L.err(f"unaligned {width * self.buf.esize}-byte load of {self.buf.name}",
                  ((sel * self.buf.esize) % (width * self.buf.esize) != 0).sum())
            sel = np.clip(sel[:, None] + np.arange(width), 0, self.buf.data.size - 1)
        w = self.buf.writer[sel]
        g = np.broadcast_to(gt, idx.shape)[mask]
        if width > 1:
            g = g[:, None]
        L.err(f"global read of {self.buf.name} written by another thread in this launch",
              ((w >= 0) & (w != g)).sum())
        out = np.zeros(idx.shape + ((width,) if width > 1 else ()), self.buf.data.dtype)
        out[mask] = self.buf.data[sel]
        return out

    def st(self, L, idx, vals, mask):
        nd = max(np.ndim(idx), np.ndim(mask), 2)
        gt = _expand(L.gtid, nd)
        idx, mask, sel = self._idx(L, idx, mask, "global write")
        v = np.broadcast_to(np.asarray(vals, self.buf.data.dtype), idx.shape)[mask]
        if self.buf.kind == "bf16":
            L.err(f"non-bf16 value stored into bf16 {self.buf.name}", (~is_bf16(v) & ~np.isnan(v)).sum())
        np.add.at(self.buf.wcount, sel, 1)
        self.buf.writer[sel] = np.broadcast_to(gt, idx.shape)[mask]
        self.buf.data[sel] = v


class Smem:
    """A __shared__ array of every block: NaN-filled, written flags, per-phase access ranges."""

    BIG = np.iinfo(np.int64).max

    def __init__(self, L, name, shape, dtype):
        self.L, self.name, self.shape = L, name, shape
        self.size = int(np.prod(shape))
        self.vals = np.full((L.B, self.size), np.nan, dtype).ravel()
        self.written = np.zeros(L.B * self.size, bool)
        self.sync()

    def sync(self):
        n = self.L.B * self.size
        self.wmin = np.full(n, self.BIG, np.int64)
        self.wmax = np.full(n, -1, np.int64)
        self.rmin = np.full(n, self.BIG, np.int64)
        self.rmax = np.full(n, -1, np.int64)

    def _keys(self, addr, mask, width):
        L = self.L
        addr = np.asarray(addr, np.int64)
        nd = max(addr.ndim, np.ndim(mask), 2)
        shape = np.broadcast_shapes(addr.shape, np.shape(mask), (L.B, L.T) + (1,) * (nd - 2))
        blk = np.broadcast_to(_expand(np.arange(L.B)[:, None], nd), shape)
        tid = np.broadcast_to(_expand(L.tid, nd), shape)
        addr = np.broadcast_to(addr, shape)
        mask = np.broadcast_to(mask, shape)
        a, b, t = addr[mask], blk[mask], tid[mask]
        L.err(f"shared {self.name} index out of range", ((a < 0) | (a + width > self.size)).sum())
        if width > 1:
            L.err(f"unaligned vector access to shared {self.name}", (a % width != 0).sum())
        a = np.clip(a, 0, self.size - width)
        k = b * self.size + a
        if width > 1:
            k = k[:, None] + np.arange(width)
            t = np.broadcast_to(t[:, None], k.shape)
        return shape, mask, k.ravel(), t.ravel()

    def ld(self, addr, mask, width=1):
        L = self.L
        shape, mask, k, t = self._keys(addr, mask, width)
        L.err(f"read of unwritten shared {self.name}", (~self.written[k]).sum())
        L.err(f"shared {self.name}: read of a location another thread wrote since the last barrier",
              ((self.wmax[k] >= 0) & ((self.wmin[k] != t) | (self.wmax[k] != t))).sum())
        np.minimum.at(self.rmin, k, t)
        np.maximum.at(self.rmax, k, t)
        out = np.zeros(shape + ((width,) if width > 1 else ()), self.vals.dtype)
        out[mask] = self.vals[k].reshape((-1, width) if width > 1 else (-1,))
        return out

    def st(self, addr, vals, mask, width=1):
        L = self.L
        shape, mask, k, t = self._keys(addr, mask, width)
        L.err(f"shared {self.name}: write to a location another thread read since the last barrier",
              ((self.rmax[k] >= 0) & ((self.rmin[k] != t) | (self.rmax[k] != t))).sum())
        np.minimum.at(self.wmin, k, t)
        np.maximum.at(self.wmax, k, t)
        L.err(f"shared {self.name}: two threads wrote one location between barriers",
              (self.wmin[k] != self.wmax[k]).sum())
        v = np.broadcast_to(np.asarray(vals), shape + ((width,) if width > 1 else ()))[mask]
        self.vals[k] = v.ravel()
        self.written[k] = True


def shfl_xor(v, o):
    """__shfl_xor_sync(0xffffffff, v, o) over [B, T] (T a multiple of 32)."""
    B, T = v.shape
    lane = np.arange(32)
    return v.reshape(B, T // 32, 32)[:, :, lane ^ o].reshape(B, T)


# ----------------------------------------------------------------------------------------------
# kernels/common.cuh
# ----------------------------------------------------------------------------------------------
def warp_sum(v):
    for o in (16, 8, 4, 2, 1):
        v = (v + shfl_xor(v, o)).astype(F32)
    return v


def warp_max(v):
    for o in (16, 8, 4, 2, 1):
        v = np.fmax(v, shfl_xor(v, o)).astype(F32)
    return v


def _block_reduce(L, v, scratch, warp_fn, ident):
    lane, warp, warps = L.tid % 32, L.tid // 32, L.T // 32
    v = warp_fn(v)
    L.sync()
    scratch.st(warp, v, L.full(lane == 0))
    L.sync()
    m = L.full(lane < warps)
    r = scratch.ld(np.broadcast_to(lane, (L.B, L.T)), m)
    v = np.where(m, r, F32(ident)).astype(F32)
    return warp_fn(v)


def block_sum(L, v, scratch):
    return _block_reduce(L, v, scratch, warp_sum, 0.0)


def block_max(L, v, scratch):
    return _block_reduce(L, v, scratch, warp_max, -np.inf)


# ----------------------------------------------------------------------------------------------
# kernels/mma.cuh
# ----------------------------------------------------------------------------------------------
BM, BN, BR, PAD = 64, 64, 32, 8
ROW = BR + PAD  # TileRow stride (bf16 elements)


def ld_pair(S, addr, mask):
    """*(const uint32_t*)&S[addr]: two bf16, the lower index in the low half."""
    v = S.ld(addr, mask, width=2)
    return bf16_bits(v[..., 0]).astype(np.uint32) | (bf16_bits(v[..., 1]).astype(np.uint32) << np.uint32(16))


_LANE = np.arange(32)
_G, _C = _LANE // 4, _LANE % 4


def mma_bf16(c, a, b):
    """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, per warp, from the PTX fragment layout.
    c: [4, B, T] f32, a: [4, B, T] u32, b: [2, B, T] u32 -> d: [4, B, T]."""
    _, B, T = c.shape
    W = T // 32
    r = lambda x: x.reshape(B, W, 32)
    lo = lambda u: bits_f32(r(u) & np.uint32(0xFFFF))
    hi = lambda u: bits_f32(r(u) >> np.uint32(16))
    g, q = _G, _C
    A = np.full((B, W, 16, 16), np.nan, F32)
    A[:, :, g, 2 * q], A[:, :, g, 2 * q + 1] = lo(a[0]), hi(a[0])
    A[:, :, g + 8, 2 * q], A[:, :, g + 8, 2 * q + 1] = lo(a[1]), hi(a[1])
    A[:, :, g, 2 * q + 8], A[:, :, g, 2 * q + 9] = lo(a[2]), hi(a[2])
    A[:, :, g + 8, 2 * q + 8], A[:, :, g + 8, 2 * q + 9] = lo(a[3]), hi(a[3])
    Bm = np.full((B, W, 16, 8), np.nan, F32)
    Bm[:, :, 2 * q, g], Bm[:, :, 2 * q + 1, g] = lo(b[0]), hi(b[0])
    Bm[:, :, 2 * q + 8, g], Bm[:, :, 2 * q + 9, g] = lo(b[1]), hi(b[1])
    C = np.full((B, W, 16, 8), np.nan, F32)
    C[:, :, g, 2 * q], C[:, :, g, 2 * q + 1] = r(c[0]), r(c[1])
    C[:, :, g + 8, 2 * q], C[:, :, g + 8, 2 * q + 1] = r(c[2]), r(c[3])
    D = (np.matmul(A, Bm, dtype=F32) + C).astype(F32)
    out = np.stack([D[:, :, g, 2 * q], D[:, :, g, 2 * q + 1], D[:, :, g + 8, 2 * q], D[:, :, g + 8, 2 * q + 1]])
    return out.reshape(4, B, T)


def _check_mma_layout(rng):
    """mma_bf16 against A @ B + C, with the fragments packed lane by lane, register by register, straight
    from the PTX ISA tables (an independent path to the one in mma_bf16)."""
    A, Bm = to_bf16(rng.normal(size=(16, 16)).astype(F32)), to_bf16(rng.normal(size=(16, 8)).astype(F32))
    C = rng.normal(size=(16, 8)).astype(F32)
    pk = lambda x0, x1: int(bf16_bits(np.array([x0]))[0]) | (int(bf16_bits(np.array([x1]))[0]) << 16)
    a = np.zeros((4, 1, 32), np.uint32)
    b = np.zeros((2, 1, 32), np.uint32)
    c = np.zeros((4, 1, 32), F32)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            a[i, 0, lane] = pk(A[row, col], A[row, col + 1])
        for i, k in enumerate([2 * t, 2 * t + 8]):
            b[i, 0, lane] = pk(Bm[k, g], Bm[k + 1, g])
        for i in range(4):
            row, col = g + 8 * (i >= 2), 2 * t + (i & 1)
            c[i, 0, lane] = C[row, col]
    d = mma_bf16(c, a, b)
    want = A.astype(np.float64) @ Bm.astype(np.float64) + C
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(4):
            assert abs(d[i, 0, lane] - want[g + 8 * (i >= 2), 2 * t + (i & 1)]) < 1e-4, "mma layout"


def stage_a(L, As, a, m0, r0, M, R):
    ok = (m0 + BM <= M) & (r0 + BR <= R) & (R % 8 == 0) & ((a.off * a.buf.esize) % 16 == 0)
    COVER["stage_a 16-byte"] += int(np.sum(ok))
    COVER["stage_a element"] += int(np.sum(~np.broadcast_to(ok, (L.B, 1))))
    for i, act in L.strided(BM * BR // 8, ok):
        m, c = i // (BR // 8), (i % (BR // 8)) * 8
        As.st(m * ROW + c, a.ld(L, (m0 + m) * R + r0 + c, act, width=8), act, width=8)
    for i, act in L.strided(BM * BR, ~np.broadcast_to(ok, (L.B, L.T))):
        m, rr = i // BR, i % BR
        if "stage_a_pad" in INJECT:
            act = act & (rr != BR - 1)
        inb = (m0 + m < M) & (r0 + rr < R)
        v = np.where(inb, a.ld(L, (m0 + m) * R + r0 + rr, act & inb), F32(0))
        As.st(m * ROW + rr, v, act)


class HeadRows:
    """B[r, c] = head[c, r]."""

    def __init__(self, head, d):
        self.head, self.d = head, d

    def __call__(self, L, r, c, mask):
        return self.head.ld(L, c * self.d + r, mask)  # to_f32 of a bf16: the value itself

    def stage(self, L, Bs, r0, n0, R, N):
        ok = (n0 + BN <= N) & (r0 + BR <= R) & (self.d % 8 == 0) & ((self.head.off * 2) % 16 == 0)
        COVER["HeadRows.stage"] += int(np.sum(ok))
        for i, act in L.strided(BN * BR // 8, ok):
            c, r = i // (BR // 8), (i % (BR // 8)) * 8
            Bs.st(c * ROW + r, self.head.ld(L, (n0 + c) * self.d + r0 + r, act, width=8), act, width=8)
        return np.broadcast_to(ok, (L.B, L.T))


class HeadCols:
    """B[r, c] = head[r, c]."""

    def __init__(self, head, d):
        self.head, self.d = head, d

    def __call__(self, L, r, c, mask):
        return self.head.ld(L, r * self.d + c, mask)

    def stage(self, L, Bs, r0, n0, R, N):
        ok = (n0 + BN <= N) & (r0 + BR <= R) & (self.d % 8 == 0) & ((self.head.off * 2) % 16 == 0)
        COVER["HeadCols.stage"] += int(np.sum(ok))
        for i, act in L.strided(BR * BN // 8, ok):
            r, c = i // (BN // 8), (i % (BN // 8)) * 8
            w = self.head.ld(L, (r0 + r) * self.d + n0 + c, act, width=8)
            for j in range(8):
                Bs.st((c + j) * ROW + r, w[..., j], act)
        return np.broadcast_to(ok, (L.B, L.T))


class StoreF32:
    def __init__(self, out, N):
        self.out, self.N = out, N

    def __call__(self, L, m, n, v, mask):
        self.out.st(L, m * self.N + n, v, mask)


class StoreBf16(StoreF32):
    def __call__(self, L, m, n, v, mask):
        self.out.st(L, m * self.N + n, to_bf16(v), mask)


def mma_gemm(L, N_FAST, a, load_b, store, M, N, R):
    assert L.T == 128, "mma_gemm: 4 warps"
    As = L.smem("As", (BM, ROW), F32, 2)
    Bs = L.smem("Bs", (BN, ROW), F32, 2)
    tid = np.broadcast_to(L.tid, (L.B, L.T))
    lane, warp = tid % 32, tid // 32
    g, q, wm, wn = lane // 4, lane % 4, (warp // 2) * 32, (warp % 2) * 32
    m0, n0 = L.by * BM, L.bx * BN
    acc = np.zeros((2, 4, 4, L.B, L.T), F32)
    allm = L.full()
    for r0 in range(0, R, BR):
        stage_a(L, As, a, m0, r0, M, R)
        staged = load_b.stage(L, Bs, r0, n0, R, N)
        COVER[f"B element (N_FAST={N_FAST})"] += int(np.sum(~staged[:, 0]))
        for i, act in L.strided(BN * BR, ~staged):
            n = i % BN if N_FAST else i // BR
            r = i // BN if N_FAST else i % BR
            inb = (n0 + n < N) & (r0 + r < R)
            v = np.where(inb, load_b(L, r0 + r, n0 + n, act & inb), F32(0))
            Bs.st(n * ROW + r, to_bf16(v), act)
        L.sync()
        for k in range(0, BR, 16):
            af = np.zeros((2, 4, L.B, L.T), np.uint32)
            bfr = np.zeros((4, 2, L.B, L.T), np.uint32)
            for mi in range(2):
                row = wm + mi * 16 + g
                af[mi, 0] = ld_pair(As, row * ROW + k + 2 * q, allm)
                af[mi, 1] = ld_pair(As, (row + 8) * ROW + k + 2 * q, allm)
                af[mi, 2] = ld_pair(As, row * ROW + k + 2 * q + 8, allm)
                af[mi, 3] = ld_pair(As, (row + 8) * ROW + k + 2 * q + 8, allm)
            for ni in range(4):
                col = wn + ni * 8 + g
                bfr[ni, 0] = ld_pair(Bs, col * ROW + k + 2 * q, allm)
                b1 = k + 2 * q if "mma_b1" in INJECT else k + 2 * q + 8
                bfr[ni, 1] = ld_pair(Bs, col * ROW + b1, allm)
            for mi in range(2):
                for ni in range(4):
                    acc[mi, ni] = mma_bf16(acc[mi, ni], af[mi], bfr[ni])
        L.sync()
    for mi in range(2):
        for ni in range(4):
            for h in range(4):
                m = m0 + wm + mi * 16 + g + (8 if h >= 2 else 0)
                n = n0 + wn + ni * 8 + 2 * q + (h & 1)
                store(L, m, n, acc[mi, ni, h], (m < M) & (n < N))


# ----------------------------------------------------------------------------------------------
# kernels/cross_entropy.cu
# ----------------------------------------------------------------------------------------------
def head_logits(L, logits, h, head, row0, rows, V, d):
    mma_gemm(L, False, h + row0 * d, HeadRows(head, d), StoreF32(logits, V), rows, V, d)


def head_grad(L, dh, dlogits, head, row0, rows, V, d):
    mma_gemm(L, True, dlogits, HeadCols(head, d), StoreBf16(dh + row0 * d, d), rows, d, V)


def ce_softmax_grad(L, dlogits, loss, logits, targets, row0, V, inv_count):
    scratch = L.smem("scratch", (32,))
    inv_count = F32(inv_count)
    i = L.bx  # [B, 1]
    allm = L.full()
    tgt_row = i if "ce_target" in INJECT else row0 + i
    target = targets.ld(L, np.broadcast_to(tgt_row, (L.B, L.T)), allm)
    m = np.full((L.B, L.T), -np.inf, F32)
    for v, act in L.strided(V):
        m = np.where(act, np.fmax(m, logits.ld(L, i * V + v, act)), m).astype(F32)
    m = block_max(L, m, scratch)
    s = np.zeros((L.B, L.T), F32)
    for v, act in L.strided(V):
        s = np.where(act, s + expf_fast(logits.ld(L, i * V + v, act) - m), s).astype(F32)
    lse = (m + logf(block_sum(L, s, scratch))).astype(F32)
    for v, act in L.strided(V):
        z = logits.ld(L, i * V + v, act)
        p = expf_fast((z - lse).astype(F32))
        val = (inv_count * (p - np.where(v == target, F32(1), F32(0))).astype(F32)).astype(F32)
        dlogits.st(L, i * V + v, to_bf16(val), act)
    t0 = L.full(L.tid == 0)
    valid = (target >= 0) & (target < V)
    zt = logits.ld(L, i * V + target, t0 & valid)
    loss.st(L, np.broadcast_to(row0 + i, (L.B, L.T)), np.where(valid, (lse - zt).astype(F32), F32(np.nan)), t0)


def argmax_rows(L, out, logits, rows, V):
    best_v = L.smem("best_v", (32,))
    best_i = L.smem("best_i", (32,), np.float64)  # int values, NaN = unwritten
    row = np.broadcast_to(L.bx, (L.B, L.T))
    live = row < rows  # if (row >= rows) return;
    bv = np.full((L.B, L.T), -np.inf, F32)
    bi = np.full((L.B, L.T), V, np.int64)
    for i, act in L.strided(V, live):
        v = logits.ld(L, row * V + i, act)
        take = act & ((v > bv) | ((v == bv) & (i < bi)))
        bv, bi = np.where(take, v, bv).astype(F32), np.where(take, i, bi)
    for o in (16, 8, 4, 2, 1):
        ov, oi = shfl_xor(bv, o), shfl_xor(bi, o)
        if "argmax_tie" in INJECT:
            take = (ov > bv) | ((ov == bv) & (oi > bi))
        else:
            take = (ov > bv) | ((ov == bv) & (oi < bi))
        bv, bi = np.where(take, ov, bv).astype(F32), np.where(take, oi, bi)
    lane, warp = L.tid % 32, L.tid // 32
    w0 = live & (lane == 0)
    best_v.st(np.broadcast_to(warp, (L.B, L.T)), bv, w0)
    best_i.st(np.broadcast_to(warp, (L.B, L.T)), bi.astype(np.float64), w0)
    L.sync()
    t0 = live & (L.tid == 0)
    for w in range(1, L.T // 32):
        wv = best_v.ld(np.full((L.B, L.T), w), t0)
        wi = best_i.ld(np.full((L.B, L.T), w), t0).astype(np.int64)
        take = t0 & ((wv > bv) | ((wv == bv) & (wi < bi)))
        bv, bi = np.where(take, wv, bv).astype(F32), np.where(take, wi, bi)
    x0 = logits.ld(L, row * V, t0)
    out.st(L, row, np.where(np.isnan(x0) | (bi >= V), 0, bi).astype(np.int32), t0)


# ----------------------------------------------------------------------------------------------
# kernels/lora.cu
# ----------------------------------------------------------------------------------------------
RP_ROWS, RP_CHUNK, RP_MAX_R, RP_THREADS = 16, 64, 64, 256
RP_PER_THREAD = RP_ROWS * RP_MAX_R // RP_THREADS
TS_COLS, TS_ROWS, TS_MAX_R, TS_THREADS = 16, 32, 64, 256
TS_PER_THREAD = TS_COLS * TS_MAX_R // TS_THREADS


def row_proj(L, out, u, m, jr, T, J, r):
    us = L.smem("us", (RP_ROWS, RP_CHUNK + 1))
    ms = L.smem("ms", (RP_MAX_R, RP_CHUNK + 1))
    t0, n_out = L.bx * RP_ROWS, RP_ROWS * r
    tid = np.broadcast_to(L.tid, (L.B, L.T))
    acc = np.zeros((RP_PER_THREAD, L.B, L.T), F32)
    JJ = np.arange(RP_CHUNK)
    for j0 in range(0, J, RP_CHUNK):
        for i, act in L.strided(RP_ROWS * RP_CHUNK):
            row, jj = i // RP_CHUNK, i % RP_CHUNK
            t, j = t0 + row, j0 + jj
            inb = (t < T) & (j < J)
            us.st(row * (RP_CHUNK + 1) + jj, np.where(inb, u.ld(L, t * J + j, act & inb), F32(0)), act)
        for i, act in L.strided(r * RP_CHUNK):
            c = i % r if jr else i // RP_CHUNK
            jj = i // r if jr else i % RP_CHUNK
            j = j0 + jj
            inb = j < J
            idx = j * r + c if jr else c * J + j
            ms.st(c * (RP_CHUNK + 1) + jj, np.where(inb, m.ld(L, idx, act & inb), F32(0)), act)
        L.sync()
        for qq in range(RP_PER_THREAD):
            o = tid + qq * RP_THREADS
            row, c = o // r, o % r
            act = o < n_out  # `if (o >= n_out) break;` (o grows with q)
            uv = us.ld(row[..., None] * (RP_CHUNK + 1) + JJ, act[..., None])
            mv = ms.ld(c[..., None] * (RP_CHUNK + 1) + JJ, act[..., None])
            s = acc[qq]
            for jj in range(RP_CHUNK):
                s = fma(uv[..., jj], mv[..., jj], s)
            acc[qq] = np.where(act, s, acc[qq])
        if "rp_nosync" not in INJECT:
            L.sync()
    for qq in range(RP_PER_THREAD):
        o = tid + qq * RP_THREADS
        row, c = o // r, o % r
        t = t0 + row
        out.st(L, t * r + c, acc[qq], (o < n_out) & (t < T))


def lora_xa(L, xa, x, a, T, K, r):
    row_proj(L, xa, x, a, False, T, K, r)


def lora_add(L, y, xa, b, T, N, r, scale):
    i = L.bx * L.T + L.tid
    act = L.full(i < T * N)
    t, n = i // N, i % N
    rr = r - 1 if "lora_add_r" in INJECT else r
    C = np.arange(rr)
    xv = xa.ld(L, (t * r)[..., None] + C, act[..., None])
    bv = b.ld(L, (n * r)[..., None] + C, act[..., None])
    s = np.zeros((L.B, L.T), F32)
    for c in range(rr):
        s = fma(xv[..., c], bv[..., c], s)
    yi = y.ld(L, i, act)
    y.st(L, i, to_bf16(fma(F32(scale), s, yi)), act)


def lora_g(L, g, dy, b, T, N, r):
    row_proj(L, g, dy, b, True, T, N, r)


def token_sum(L, out, rank_major, u, w, T, U, r, scale):
    us = L.smem("us", (TS_ROWS, TS_COLS))
    ws = L.smem("ws", (TS_ROWS, TS_MAX_R))
    col0, n_out = L.bx * TS_COLS, TS_COLS * r
    tid = np.broadcast_to(L.tid, (L.B, L.T))
    acc = np.zeros((TS_PER_THREAD, L.B, L.T), F32)
    RR = np.arange(TS_ROWS)
    for t0 in range(0, T, TS_ROWS):
        for i, act in L.strided(TS_ROWS * TS_COLS):
            row, cc = i // TS_COLS, i % TS_COLS
            t, col = t0 + row, col0 + cc
            inb = (t < T) & (col < U)
            us.st(row * TS_COLS + cc, np.where(inb, u.ld(L, t * U + col, act & inb), F32(0)), act)
        for i, act in L.strided(TS_ROWS * r):
            row, c = i // r, i % r
            t = t0 + row
            inb = t < T
            ws.st(row * TS_MAX_R + c, np.where(inb, w.ld(L, t * r + c, act & inb), F32(0)), act)
        L.sync()
        for j in range(TS_PER_THREAD):
            o = tid + j * TS_THREADS
            cc, c = o % TS_COLS, o // TS_COLS
            act = o < n_out
            uv = us.ld(RR * TS_COLS + cc[..., None], act[..., None])
            wv = ws.ld(RR * TS_MAX_R + c[..., None], act[..., None])
            s = acc[j]
            for row in range(TS_ROWS):
                s = fma(uv[..., row], wv[..., row], s)
            acc[j] = np.where(act, s, acc[j])
        L.sync()
    for j in range(TS_PER_THREAD):
        o = tid + j * TS_THREADS
        cc, c = o % TS_COLS, o // TS_COLS
        col = col0 + cc
        act = o < n_out
        if "ts_tail" not in INJECT:
            act = act & (col < U)
        idx = c * U + col if rank_major else col * r + c
        old = out.ld(L, idx, act)
        out.st(L, idx, fma(F32(scale), acc[j], old), act)


def lora_db(L, db, dy, xa, T, N, r, scale):
    token_sum(L, db, False, dy, xa, T, N, r, scale)


def lora_da(L, da, g, x, T, K, r, scale):
    token_sum(L, da, True, x, g, T, K, r, scale)


def lora_dx(L, dx, g, a, T, K, r, scale):
    i = L.bx * L.T + L.tid
    act = L.full(i < T * K)
    t, k = i // K, i % K
    C = np.arange(r)
    gv = g.ld(L, (t * r)[..., None] + C, act[..., None])
    av = a.ld(L, C * K + k[..., None], act[..., None])
    s = np.zeros((L.B, L.T), F32)
    for c in range(r):
        s = fma(gv[..., c], av[..., c], s)
    di = dx.ld(L, i, act)
    dx.st(L, i, to_bf16(fma(F32(scale), s, di)), act)


# ----------------------------------------------------------------------------------------------
# Launch configurations (src/backend/cuda/mod.rs, ops.rs) and the wrappers
# ----------------------------------------------------------------------------------------------
def blocks_for(n):
    return ((max(-(-n // 256), 1), 1, 1), 256)


def block_per_row(rows):
    return ((rows, 1, 1), 256)


def mma_tiles(rows, cols):
    return ((-(-cols // 64), -(-rows // 64), 1), 128)


def per_16(n):
    return ((max(-(-n // 16), 1), 1, 1), 256)


MAX_RANK = 64
LAUNCHES = []  # (kernel, grid, block, static shared bytes, problems)


def run(kernel, cfg, outs, *args):
    grid, block = cfg
    L = Launch(kernel.__name__, grid, block)
    for b in list(ALL_BUFS):
        b.begin()
    kernel(L, *args)
    L.wc = {id(b): b.wcount.copy() for b in outs}  # this launch's write counts per output
    assert L.static_smem <= 48 * 1024, "static shared memory over 48 KiB"
    LAUNCHES.append((kernel.__name__, grid, block, L.static_smem, dict(L.errors)))
    return L


class LoraAt:
    def __init__(self, a, b, inp, out):
        self.a, self.b, self.inp, self.out = a, b, inp, out


def w_lora_fwd(y, xa, x, w, at, t, r, scale):
    k, n = at.inp, at.out
    assert x.data.size >= t * k and y.data.size >= t * n and xa.data.size >= t * r
    assert at.b == at.a + r * k and at.b + n * r <= w.data.size, "lora_fwd: adapter out of range"
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is over the {MAX_RANK} the GPU kernels take")
    a, b = w.ptr(at.a, at.b), w.ptr(at.b, at.b + n * r)
    l1 = run(lora_xa, per_16(t), [xa], xa.ptr(), x.ptr(), a, t, k, r)
    l2 = run(lora_add, blocks_for(t * n), [y], y.ptr(), xa.ptr(), b, t, n, r, scale)
    return l1, l2


def w_lora_bwd(dx, grad, g, dy, x, xa, w, at, t, r, scale):
    k, n = at.inp, at.out
    assert dx.data.size >= t * k and x.data.size >= t * k and dy.data.size >= t * n
    assert xa.data.size >= t * r and g.data.size >= t * r
    assert at.b == at.a + r * k and at.b + n * r <= min(w.data.size, grad.data.size), "lora_bwd: adapter out of range"
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is over the {MAX_RANK} the GPU kernels take")
    a, b = w.ptr(at.a, at.b), w.ptr(at.b, at.b + n * r)
    da, db = grad.ptr(at.a, at.b), grad.ptr(at.b, at.b + n * r)  # split_at_mut(at.b), slices
    l1 = run(lora_g, per_16(t), [g], g.ptr(), dy.ptr(), b, t, n, r)
    l2 = run(lora_db, per_16(n), [grad], db, dy.ptr(), xa.ptr(), t, n, r, scale)
    l3 = run(lora_da, per_16(k), [grad], da, g.ptr(), x.ptr(), t, k, r, scale)
    l4 = run(lora_dx, blocks_for(t * k), [dx], dx.ptr(), g.ptr(), a, t, k, r, scale)
    return l1, l2, l3, l4


def w_head_logits(logits, h, head, row0, rows, d):
    v = head.data.size // d
    assert logits.data.size >= rows * v and h.data.size >= (row0 + rows) * d and head.data.size == v * d
    if rows == 0:
        return None
    return run(head_logits, mma_tiles(rows, v), [logits], logits.ptr(), h.ptr(), head.ptr(), row0, rows, v, d)


def w_argmax_rows(out, logits, rows, v):
    assert out.data.size >= rows and logits.data.size >= rows * v and v > 0
    if rows == 0:
        return None
    return run(argmax_rows, block_per_row(rows), [out], out.ptr(), logits.ptr(), rows, v)


def w_head_grad(dh, dlogits, head, row0, rows, d):
    v = head.data.size // d
    assert dlogits.data.size >= rows * v and dh.data.size >= (row0 + rows) * d and head.data.size == v * d
    if rows == 0:
        return None
    return run(head_grad, mma_tiles(rows, d), [dh], dh.ptr(), dlogits.ptr(), head.ptr(), row0, rows, v, d)


def w_ce_softmax_grad(dlogits, loss, logits, targets, row0, rows, vocab, inv_count):
    assert dlogits.data.size >= rows * vocab and logits.data.size >= rows * vocab
    assert loss.data.size >= row0 + rows and targets.data.size >= row0 + rows
    if rows == 0:
        return None
    return run(ce_softmax_grad, block_per_row(rows), [dlogits, loss], dlogits.ptr(), loss.ptr(), logits.ptr(),
               targets.ptr(), row0, vocab, F32(inv_count))


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
RESULTS = []  # (kernel, case, err, tol, problems)


def rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape or not np.isfinite(got).all():
        return np.inf
    return float(np.sqrt(((got - want) ** 2).sum() / max((want ** 2).sum(), 1e-30)))


def writes(L, buf, expect, label):
    """Problems with launch L's write counts of buf against the expected mask (1 inside, 0 outside)."""
    p = []
    wc = L.wc[id(buf)]
    if (wc[expect] == 0).any():
        p.append(f"{label}: {(wc[expect] == 0).sum()} unwritten")
    if (wc > 1).any():
        p.append(f"{label}: {(wc > 1).sum()} written >1x")
    if (wc[~expect] > 0).any():
        p.append(f"{label}: {(wc[~expect] > 0).sum()} written outside range")
    return p


def record(kernel, case, err, tol, launches=(), problems=()):
    probs = list(problems)
    for L in launches:
        if L is not None:
            probs += [f"{m} (x{c})" for m, c in L.errors.items()]
    RESULTS.append((kernel, case, err, tol, probs))


def bf_rand(rng, shape, std):
    return to_bf16(rng.normal(0.0, std, shape).astype(F32))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def test_lora(rng, t, n, k, r, scale=2.0):
    case = f"T{t} out{n} in{k} r{r}"
    x, a, b = bf_rand(rng, (t, k), 1.0), bf_rand(rng, (r, k), 0.3), bf_rand(rng, (n, r), 0.3)
    y0 = bf_rand(rng, (t, n), 1.0)
    at = LoraAt(5, 5 + r * k, k, n)  # after 5 values of another adapter, 3 more after (selftest layout)
    wlen = at.b + n * r + 3
    w = bf_rand(rng, wlen, 0.3)
    w[at.a:at.b], w[at.b:at.b + n * r] = a.ravel(), b.ravel()
    W, X = Buf("w", w, "bf16"), Buf("x", x, "bf16")
    Y, XA = Buf("y", y0, "bf16"), Buf("xa", np.full(t * r, np.nan), "f32")
    l1, l2 = w_lora_fwd(Y, XA, X, W, at, t, r, scale)
    xd, ad, bd = x.astype(np.float64), a.astype(np.float64), b.astype(np.float64)
    xa_ref = xd @ ad.T
    record("lora_xa", case, rel(XA.data, xa_ref.ravel()), 1e-5, [l1], writes(l1, XA, np.ones(t * r, bool), "xa"))
    y_ref = y0.astype(np.float64) + scale * xa_ref @ bd.T
    record("lora_add", case, rel(Y.data, y_ref.ravel()), 1e-2, [l2], writes(l2, Y, np.ones(t * n, bool), "y"))

    dy, dx0 = bf_rand(rng, (t, n), 1.0), bf_rand(rng, (t, k), 1.0)
    grad0 = np.full(wlen, np.nan, F32)
    prior = rng.normal(0.0, 0.5, at.b + n * r - at.a).astype(F32)  # the gradients accumulate
    grad0[at.a:at.b + n * r] = prior
    G, DX = Buf("grad", grad0, "f32"), Buf("dx", dx0, "bf16")
    Gs, DY = Buf("g", np.full(t * r, np.nan), "f32"), Buf("dy", dy, "bf16")
    xa_used = XA.data.astype(np.float64).reshape(t, r)  # the forward's xa, as the engine passes it
    l3, l4, l5, l6 = w_lora_bwd(DX, G, Gs, DY, X, XA, W, at, t, r, scale)
    dyd = dy.astype(np.float64)
    g_ref = dyd @ bd
    record("lora_g", case, rel(Gs.data, g_ref.ravel()), 1e-5, [l3], writes(l3, Gs, np.ones(t * r, bool), "g"))
    in_db = np.zeros(wlen, bool)
    in_db[at.b:at.b + n * r] = True
    in_da = np.zeros(wlen, bool)
    in_da[at.a:at.b] = True
    gd = G.data.astype(np.float64)
    db_ref = scale * dyd.T @ xa_used
    da_ref = scale * g_ref.T @ xd
    outside = ~(in_da | in_db)
    nb = [] if np.isnan(G.data[outside]).all() else [f"grad neighbours changed: {(~np.isnan(G.data[outside])).sum()}"]
    p_db = writes(l4, G, in_db, "dB") + nb
    err_db = rel(gd[in_db] - prior[at.b - at.a:], db_ref.ravel())
    record("lora_db", case, err_db, 1e-4, [l4], p_db)
    err_da = rel(gd[in_da] - prior[:at.b - at.a], da_ref.ravel())
    record("lora_da", case, err_da, 1e-4, [l5], writes(l5, G, in_da, "dA") + nb)
    dx_ref = dx0.astype(np.float64) + scale * g_ref @ ad
    record("lora_dx", case, rel(DX.data, dx_ref.ravel()), 1e-2, [l6], writes(l6, DX, np.ones(t * k, bool), "dx"))



def test_ce(rng, t, n_lab, d, V, chunk):
    """loss_and_dh (src/engine/step.rs) on n_lab labelled rows of t tokens, in chunks of `chunk`."""
    case = f"T{t} n{n_lab} d{d} V{V} ch{chunk}"
    h = bf_rand(rng, (t, d), 1.0)
    head = bf_rand(rng, (V, d), 0.1)
    labels = np.sort(rng.choice(t, n_lab, replace=False))
    targets_all = rng.integers(0, V, t)
    ids = targets_all[labels].astype(np.int32)
    n = n_lab
    inv = F32(1.0 / n)
    h_lab = h[labels]  # gather_rows (another kernel): done here
    H, HEAD = Buf("h_lab", h_lab, "bf16"), Buf("head", head, "bf16")
    TG = Buf("targets", ids, "i32")
    DH = Buf("dh_lab", np.full(n * d, np.nan), "bf16")
    LOSS = Buf("loss", np.full(n, np.nan), "f32")
    LOG = Buf("logits", np.full(chunk * V, np.nan), "f32")  # [ce_rows, V], reused per chunk
    DLOG = Buf("dlogits", np.full(chunk * V, np.nan), "bf16")
    hd, wd = h_lab.astype(np.float64), head.astype(np.float64)
    dh_written = np.zeros(n * d, np.int32)
    loss_written = np.zeros(n, np.int32)
    errs = {"head_logits": [], "ce_softmax_grad dlogits": [], "ce_softmax_grad loss": [], "head_grad": []}
    launches = {k: [] for k in ("head_logits", "ce_softmax_grad", "head_grad")}
    probs = {k: [] for k in launches}
    for r0 in range(0, n, chunk):
        rows = min(chunk, n - r0)
        LOG.data[:] = np.nan  # poisoned before each launch
        DLOG.data[:] = np.nan
        l1 = w_head_logits(LOG, H, HEAD, r0, rows, d)
        ref = hd[r0:r0 + rows] @ wd.T
        errs["head_logits"].append((LOG.data[:rows * V].copy(), ref.ravel()))
        exp = np.zeros(chunk * V, bool)
        exp[:rows * V] = True
        probs["head_logits"] += writes(l1, LOG, exp, f"logits r0={r0}")
        z = LOG.data[:rows * V].astype(np.float64).reshape(rows, V)  # the kernel's input
        l2 = w_ce_softmax_grad(DLOG, LOSS, LOG, TG, r0, rows, V, inv)
        mz = z.max(1, keepdims=True)
        lse = mz + np.log(np.exp(z - mz).sum(1, keepdims=True))
        tg = ids[r0:r0 + rows]
        p = np.exp(z - lse)
        onehot = np.zeros_like(p)
        onehot[np.arange(rows), tg] = 1
        errs["ce_softmax_grad dlogits"].append((DLOG.data[:rows * V].copy(), (float(inv) * (p - onehot)).ravel()))
        errs["ce_softmax_grad loss"].append((LOSS.data[r0:r0 + rows].copy(), (lse[:, 0] - z[np.arange(rows), tg])))
        probs["ce_softmax_grad"] += writes(l2, DLOG, exp, f"dlogits r0={r0}")
        exp_l = np.zeros(n, bool)
        exp_l[r0:r0 + rows] = True
        probs["ce_softmax_grad"] += writes(l2, LOSS, exp_l, f"loss r0={r0}")
        loss_written += l2.wc[id(LOSS)]
        dl = DLOG.data[:rows * V].astype(np.float64).reshape(rows, V)
        l3 = w_head_grad(DH, DLOG, HEAD, r0, rows, d)
        errs["head_grad"].append((DH.data[r0 * d:(r0 + rows) * d].copy(), (dl @ wd).ravel()))
        exp_d = np.zeros(n * d, bool)
        exp_d[r0 * d:(r0 + rows) * d] = True
        probs["head_grad"] += writes(l3, DH, exp_d, f"dh r0={r0}")
        dh_written += l3.wc[id(DH)]
        launches["head_logits"].append(l1)
        launches["ce_softmax_grad"].append(l2)
        launches["head_grad"].append(l3)
    cat = lambda lst: (np.concatenate([a for a, _ in lst]), np.concatenate([b for _, b in lst]))
    record("head_logits", case, rel(*cat(errs["head_logits"])), 1e-4, launches["head_logits"], probs["head_logits"])
    record("ce_softmax_grad dlogits", case, rel(*cat(errs["ce_softmax_grad dlogits"])), 1e-2,
           launches["ce_softmax_grad"], probs["ce_softmax_grad"])
    record("ce_softmax_grad loss", case, rel(*cat(errs["ce_softmax_grad loss"])), 1e-4)
    record("head_grad", case, rel(*cat(errs["head_grad"])), 1e-2, launches["head_grad"], probs["head_grad"])
    # End to end against the CPU spec (cross_entropy_fwd_bwd, f64): loss sum and dh on the labelled rows.
    zf = hd @ wd.T
    mz = zf.max(1, keepdims=True)
    lse = mz + np.log(np.exp(zf - mz).sum(1, keepdims=True))
    pf = np.exp(zf - lse)
    want_loss = float((lse[:, 0] - zf[np.arange(n), ids]).sum())
    oh = np.zeros_like(pf)
    oh[np.arange(n), ids] = 1
    want_dh = (float(inv) * (pf - oh)) @ wd
    got_loss = float(LOSS.data.astype(np.float64).sum())
    p_e2e = []
    if (loss_written != 1).any():
        p_e2e.append(f"loss rows written {sorted(set(loss_written.tolist()))} times")
    if (dh_written != 1).any():
        p_e2e.append(f"dh_lab elements written {sorted(set(dh_written.tolist()))} times")
    e_loss = abs(got_loss - want_loss) / abs(want_loss) if np.isfinite(got_loss) else np.inf
    record("CE e2e loss sum", case, e_loss, 1e-4, problems=p_e2e)
    record("CE e2e dh", case, rel(DH.data, want_dh.ravel()), 1e-2)


def cpu_argmax(row):
    """generate::argmax: best = 0; if v > logits[best] { best = i }."""
    if np.isnan(row[0]):
        return 0
    return int(np.argmax(np.where(np.isnan(row), -np.inf, row)))


def test_argmax(rng, rows, v):
    case = f"{rows}x{v}"
    lg = rng.normal(0.0, 3.0, rows * v).astype(F32)
    lg[v // 3] = 50.0  # a tie in row 0: the first index wins
    lg[v // 2] = 50.0
    if rows > 1:
        lg[v] = np.nan  # row 1 led by NaN -> 0
    if rows > 2:  # row 2: a tie inside one thread's stride and NaN elsewhere
        base = 2 * v
        lg[base + min(300, v - 1)] = 40.0
        lg[base + min(44, v - 1)] = 40.0
        lg[base + v - 1] = np.nan
    if rows > 3:  # row 3: all -inf -> 0
        lg[3 * v:4 * v] = -np.inf
    if rows > 4:  # row 4: the maximum at the last index, ties across warps at a lower value
        lg[4 * v + v - 1] = 60.0
    OUT = Buf("out", np.full(rows, -12345), "i32")
    L = w_argmax_rows(OUT, Buf("logits", lg, "f32"), rows, v)
    want = np.array([cpu_argmax(lg[i * v:(i + 1) * v]) for i in range(rows)])
    wrong = int((OUT.data != want).sum())
    record("argmax_rows", case, float(wrong), 0.0, [L], writes(L, OUT, np.ones(rows, bool), "out"))


INJECT_SUBSET = {"mma_b1": "ce", "ce_target": "ce", "stage_a_pad": "ce", "argmax_tie": "argmax",
                 "rp_nosync": "lora", "ts_tail": "lora", "lora_add_r": "lora"}


def validate():
    import subprocess
    bad = 0
    for name in INJECTIONS:
        r = subprocess.run([sys.executable, __file__, "--inject", name, "--only", INJECT_SUBSET[name]],
                           capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if " checks, " in x]
        caught = r.returncode == 1 and line
        bad += not caught
        print(f"{name:12s} {'caught' if caught else 'NOT CAUGHT'}  rc={r.returncode}  {line[0] if line else r.stderr[-200:]}")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inject", action="append", default=[], choices=sorted(INJECTIONS))
    ap.add_argument("--list-injections", action="store_true")
    ap.add_argument("--verbose", "-v", action="store_true", help="one line per case")
    ap.add_argument("--validate", action="store_true",
                    help="run every injection (in a subprocess) and check that each one fails")
    ap.add_argument("--only", choices=["ce", "lora", "argmax"], action="append")
    args = ap.parse_args()
    if args.list_injections:
        for k, v in INJECTIONS.items():
            print(f"{k:14s} {v}")
        return 0
    if args.validate:
        return validate()
    INJECT.update(args.inject)
    only = set(args.only or ["ce", "lora", "argmax"])
    t_start = time.time()
    rng = np.random.default_rng(1234)
    _check_mma_layout(rng)
    if "argmax" in only:
        for rows, v in [(1, 7), (5, 1000), (5, 5003), (3, 49152), (2, 128256)]:
            test_argmax(rng, rows, v)
    if "lora" in only:
        # (tokens, out, in, r): tails of 16 tokens / 16 columns / 32-token chunks / 64-column chunks
        widths = [64, 72, 200, 576]
        cases = []
        for ti, t in enumerate([1, 15, 16, 17, 70]):
            for ri, r in enumerate([1, 8, 16, 64]):
                cases.append((t, widths[(ti + ri) % 4], widths[(ti + 2 * ri + 1) % 4], r))
        # and the selftest's odd shapes: widths under one 16-column block, past 32-token chunks
        cases += [(1, 3, 5, 1), (17, 3, 5, 1), (33, 50, 33, 16), (70, 50, 33, 64), (6, 40, 64, 4)]
        for t, n, k, r in cases:
            test_lora(rng, t, n, k, r)
        try:
            w_lora_fwd(Buf("y", np.zeros(65), "bf16"), Buf("xa", np.zeros(65), "f32"), Buf("x", np.zeros(1), "bf16"),
                       Buf("w", np.zeros(65 + 65), "bf16"), LoraAt(0, 65, 1, 1), 1, 65, 1.0)
            record("lora r=65 refused", "wrapper", np.inf, 0.0, problems=["r > 64 was launched"])
        except ValueError:
            record("lora r=65 refused", "wrapper", 0.0, 0.0)
    if "ce" in only:
        # (tokens, labelled rows, d, V, rows per chunk)
        for t, n, d, V, ch in [(1, 1, 64, 7, 1), (15, 12, 72, 1000, 8), (16, 13, 200, 7, 16),
                               (17, 16, 576, 5003, 9), (70, 66, 64, 1000, 64), (70, 53, 36, 1000, 35),
                               (70, 64, 576, 5003, 64), (170, 130, 72, 1000, 128)]:
            test_ce(rng, t, n, d, V, ch)
    elapsed = time.time() - t_start

    fails = 0
    summary = {}
    for kernel, case, err, tol, probs in RESULTS:
        ok = err <= tol and not probs
        fails += not ok
        e = summary.setdefault(kernel, [0, 0, -1.0, "", tol])
        e[0] += 1
        e[1] += not ok
        if err > e[2]:
            e[2], e[3] = err, case
        if args.verbose or not ok:
            print(f"{'FAIL' if not ok else 'ok':4s} {kernel:22s} {case:28s} {err:10.2e} (tol {tol:.0e})"
                  + ("" if not probs else "  " + "; ".join(probs[:4]) + (" ..." if len(probs) > 4 else "")))
    print(f"{'kernel / output':24s} {'cases':>5s} {'failed':>6s} {'worst rel err':>13s} {'tol':>6s}  worst case")
    for k, (n, nf, w, c, tol) in summary.items():
        print(f"{k:24s} {n:5d} {nf:6d} {w:13.2e} {tol:6.0e}  {c}")
    print(f"\n{len(RESULTS)} checks, {fails} failed, {len(LAUNCHES)} launches emulated, {elapsed:.1f} s"
          + (f"  [injected: {', '.join(sorted(INJECT))}]" if INJECT else ""))
    smem = {}
    for name, grid, block, sm, _ in LAUNCHES:
        smem[name] = (block, sm)
    print("mma staging paths taken (block-slices): " + ", ".join(f"{k} {v}" for k, v in sorted(COVER.items())))
    print("block / static shared bytes: " + ", ".join(f"{k} {b}/{s}" for k, (b, s) in smem.items()))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
