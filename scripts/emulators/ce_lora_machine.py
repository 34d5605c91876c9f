"""The simulated machine of the loss/LoRA emulator (scripts/emulate_ce_lora.py): f32/bf16 numerics
(FMA, __expf), launches over [blocks, threads], device buffers and pointers and shared memory with
bounds, alignment, write and race tracking, warp shuffles, the block reductions of kernels/common.cuh
and the mma.sync m16n8k16 bf16 fragments used by kernels/mma.cuh."""
import weakref
from collections import Counter

import numpy as np

F32 = np.float32


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
# mma.sync fragments (kernels/mma.cuh)
# ----------------------------------------------------------------------------------------------
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
