"""The NF4 emulator's (scripts/emulate_nf4.py) view of kernels/nf4.cu and mma.cuh: the NF4 constant
tables (parsed from nf4.cu and from the CPU spec src/model/nf4.rs), the device helpers, every kernel
lane by lane, and the launch configurations of the Rust wrappers. INJECT holds the deliberately broken
variants chosen with --inject."""
import os
import re
from fractions import Fraction

import numpy as np

from .gpu import bf16_bits, bf16_to_f32, fma, mma_bf16, strided
from .nf4_machine import block_max, f32, ld_pair, pack8_store, Smem, warp_max, warp_sum

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
INJECT = set()


# ----------------------------------------------------------------------------- constants
def f32_exact(s):
    """A decimal literal rounded once, correctly, to f32 (as nvcc / rustc do)."""
    s = s.replace("_", "").rstrip("fF")
    exact = Fraction(s)
    c = np.float32(float(s))
    best = None
    for cand in (np.nextafter(c, f32(-np.inf)), c, np.nextafter(c, f32(np.inf))):
        d = abs(Fraction(float(cand)) - exact)
        key = (d, int(np.array(cand, f32).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


def parse_array(path, pattern):
    text = open(path).read()
    m = re.search(pattern, text, re.S)
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return np.array([f32_exact(t.strip()) for t in body.split(",") if t.strip()], f32)


CU_TABLE = parse_array(f"{ROOT}/kernels/nf4.cu", r"NF4_TABLE\[16\]\s*=\s*\{(.*?)\}")
CU_MID = parse_array(f"{ROOT}/kernels/nf4.cu", r"NF4_MID\[15\]\s*=\s*\{(.*?)\}")
RS_TABLE = parse_array(f"{ROOT}/src/model/nf4.rs", r"NF4_TABLE: \[f32; 16\] = \[(.*?)\];")
RS_MID = parse_array(f"{ROOT}/src/model/nf4.rs", r"NF4_MIDPOINTS: \[f32; 15\] = \[(.*?)\];")


def dynamic_map():
    """src/model/nf4.rs dynamic_map(): each entry in f64, rounded once to f32, sorted."""
    data = []
    for e in range(7):
        n = 1 << e
        scale = 1.0 / (10.0 ** (6 - e))  # 10f64.powi(e - 6): exact 10^k, one division
        for i in range(n):
            lo = 0.1 + 0.9 * i / n
            hi = 0.1 + 0.9 * (i + 1) / n
            mean = (lo + hi) / 2.0
            data.append(f32(scale * mean))
            data.append(f32(-scale * mean))
    data += [f32(0.0), f32(1.0)]
    d = np.array(data, f32)
    d.sort()
    assert len(d) == 256
    return d


DYN = dynamic_map()


# ----------------------------------------------------------------------------- nf4.cu device helpers
TABLE = CU_TABLE  # the kernel's __constant__ tables
MID = CU_MID


def nf4_code(v):  # nf4.cu:23
    v = np.asarray(v, f32)
    c = np.zeros(v.shape, np.uint8)
    for i in range(15):
        c += (v >= MID[i]) if "mid" in INJECT else (v > MID[i])
    return c


def nf4_at(packed, absmax, e, mask):  # nf4.cu:113
    e = np.asarray(e, np.int64)
    b = packed.read(e >> 1, mask)
    code = np.where((e & 1) == 1, b & 15, b >> 4)
    return (TABLE[code] * absmax.read(e >> 6, mask)).astype(f32)


def nf4_decode16(packed, absmax, e, mask):  # nf4.cu:193; returns [..., 16] bf16
    e = np.asarray(e, np.int64)
    byts = packed.vread(e // 2, 8, mask)  # one uint2 load (8 bytes)
    s = absmax.read(e >> 6, mask)
    straddle = ((e >> 6) != ((e + 15) >> 6)) & mask
    if straddle.any():
        packed.ctx.flag("decode16 straddles a 64-block", f"{e[straddle][0]}")
    out = np.zeros(e.shape + (16,), np.uint16)
    for j in range(8):
        b = byts[..., j].astype(np.uint32)  # ((j<4 ? x : y) >> 8*(j%4)) & 0xff: byte j, little-endian
        out[..., 2 * j] = bf16_bits(TABLE[b >> 4] * s)
        out[..., 2 * j + 1] = bf16_bits(TABLE[b & 15] * s)
    return out


# ----------------------------------------------------------------------------- kernels
def k_nf4_quantize(ctx, grid, block, packed, absmax, x, n):
    G, B = grid[0], block[0]
    tid_x = np.tile(np.arange(B), G)
    bid = np.repeat(np.arange(G), B)
    blk = bid.astype(np.int64) * (B // 32) + tid_x // 32
    lane = tid_x % 32
    live = ~(blk * 64 >= n)  # return: warp-uniform
    e = blk * 64 + 2 * lane
    a = np.where(e < n, x.read(e, live & (e < n)), f32(0))
    b = np.where(e + 1 < n, x.read(e + 1, live & (e + 1 < n)), f32(0))
    m = warp_max(ctx, np.fmax(f32(0), np.fmax(np.abs(a), np.abs(b))).astype(f32), live)
    inv = np.where(m > 0, f32(1) / m, f32(0)).astype(f32)
    absmax.write(blk, m, live & (lane == 0))
    live2 = live & ~(e >= n)
    hi = nf4_code(a * inv)  # __fmul_rn: a plain f32 product
    lo_ok = (e + 1 <= n) if "qlo" in INJECT else (e + 1 < n)
    lo = np.where(lo_ok, nf4_code(b * inv), 0).astype(np.uint8)
    packed.write(e // 2, (hi << 4) | lo, live2)


def k_nf4_absmax_mean(ctx, grid, block, offset, absmax, nblocks):
    assert grid[0] == 1
    B = block[0]
    tid = np.arange(B)
    part = Smem(ctx, "part", 32, np.float64, tid)
    s = np.zeros(B, np.float64)
    for i, act in strided(tid, B, nblocks):
        s = np.where(act, s + absmax.read(i, act).astype(np.float64), s)
    s = warp_sum(ctx, s)  # in double
    part.st(tid // 32, s, tid % 32 == 0)
    part.barrier()
    t0 = tid == 0
    total = 0.0
    for w in range(B // 32):
        total += part.ld(np.full(B, w), t0)[0]  # thread 0 reads part[w]
    offset.write(np.array([0]), np.array([f32(total / nblocks) if nblocks > 0 else f32(0)]), t0[:1])


def k_nf4_double_quantize(ctx, grid, block, qabsmax, absmax2, absmax, offset, dyn_map, nblocks):
    B = block[0]
    tid = np.arange(B)
    for bx in range(grid[0]):
        scratch = Smem(ctx, "scratch", 32, f32, tid)
        b = bx * 256 + tid
        c = np.where(b < nblocks, (absmax.read(b, b < nblocks) - offset.read(np.zeros(B, np.int64), b < nblocks)).astype(f32), f32(0))
        m = block_max(ctx, np.fmax(f32(0), np.abs(c)).astype(f32), scratch, tid, B)
        absmax2.write(np.full(B, bx), m, tid == 0)
        live = ~(b >= nblocks)
        v = (c * np.where(m > 0, f32(1) / m, f32(0))).astype(f32)  # __fmul_rn
        lo = np.zeros(B, np.int64)
        hi = np.full(B, 256, np.int64)
        while True:
            act = live & (lo < hi)
            if not act.any():
                break
            mid = (lo + hi) // 2
            less = dyn_map.read(mid, act) < v
            lo = np.where(act & less, mid + 1, lo)
            hi = np.where(act & ~less, mid, hi)
        up = np.minimum(lo, 255)
        down = np.maximum(up - 1, 0)
        md, mu = dyn_map.read(down, live), dyn_map.read(up, live)
        pick = np.where(np.abs((v - md).astype(f32)) <= np.abs((mu - v).astype(f32)), down, up)
        qabsmax.write(b, pick.astype(np.uint8), live)


def k_nf4_dequantize_absmax(ctx, grid, block, absmax, qabsmax, absmax2, dyn_map, offset, nblocks):
    G, B = grid[0], block[0]
    b = np.repeat(np.arange(G, dtype=np.int64), B) * B + np.tile(np.arange(B), G)
    live = ~(b >= nblocks)
    q = qabsmax.read(b, live)
    prod = (dyn_map.read(q.astype(np.int64), live) * absmax2.read(b // 256, live)).astype(f32)  # __fmul_rn
    absmax.write(b, (prod + f32(offset)).astype(f32), live)  # __fadd_rn


def k_nf4_dequantize(ctx, grid, block, out, packed, absmax, n):
    G, B = grid[0], block[0]
    j = np.repeat(np.arange(G, dtype=np.int64), B) * B + np.tile(np.arange(B), G)
    live = ~(2 * j >= n)
    byte = packed.read(j, live)
    out.write(2 * j, bf16_bits(TABLE[byte >> 4] * absmax.read((2 * j) // 64, live)), live)
    m2 = live & (2 * j + 1 < n)
    out.write(2 * j + 1, bf16_bits(TABLE[byte & 15] * absmax.read((2 * j + 1) // 64, m2)), m2)


TT, TN, TK = 16, 64, 32


def k_nf4_gemm_fwd(ctx, grid, block, y, x, packed, absmax, bias, T, N, K):
    assert block == (64, 4, 1)
    tid = np.arange(256)
    tx, ty = tid % 64, tid // 64
    for by in range(grid[1]):
        for bx in range(grid[0]):
            xs = Smem(ctx, "xs", TT * (TK + 1), f32, tid)
            ws = Smem(ctx, "ws", TN * (TK + 1), f32, tid)
            n, t0 = bx * TN + tx, by * TT
            acc = np.zeros((256, 4), f32)
            for k0 in range(0, K, TK):
                for i, act in strided(tid, 256, TT * TK):
                    r, c = i // TK, i % TK
                    t, k = t0 + r, k0 + c
                    ok = act & (t < T) & (k < K)
                    xs.st(r * (TK + 1) + c, np.where(ok, bf16_to_f32(x.read(t.astype(np.int64) * K + k, ok)), f32(0)), act)
                for i, act in strided(tid, 256, TN * TK):
                    r, c = i // TK, i % TK
                    nn, k = bx * TN + r, k0 + c
                    ok = act & (nn < N) & (k < K)
                    ws.st(r * (TK + 1) + c, np.where(ok, nf4_at(packed, absmax, nn.astype(np.int64) * K + k, ok), f32(0)), act)
                xs.barrier(); ws.barrier()
                for c in range(TK):
                    w = ws.ld(tx * (TK + 1) + c)
                    for j in range(4):
                        acc[:, j] = fma(xs.ld((ty + 4 * j) * (TK + 1) + c), w, acc[:, j])
                if "nosync" not in INJECT:
                    xs.barrier(); ws.barrier()
            live = ~(n >= N)
            b = bf16_to_f32(bias.read(n, live)) if bias is not None else np.zeros(256, f32)
            for j in range(4):
                t = t0 + ty + 4 * j
                tok = (t <= T) if "bound" in INJECT else (t < T)
                y.write(t.astype(np.int64) * N + n, bf16_bits(acc[:, j] + b), live & tok)


def k_nf4_gemm_bwd_input(ctx, grid, block, dx, dy, packed, absmax, T, N, K):
    assert block == (64, 4, 1)
    tid = np.arange(256)
    tx, ty = tid % 64, tid // 64
    for by in range(grid[1]):
        for bx in range(grid[0]):
            ds = Smem(ctx, "ds", TT * (TK + 1), f32, tid)
            ws = Smem(ctx, "ws", TK * (TN + 1), f32, tid)
            k, t0 = bx * TN + tx, by * TT
            acc = np.zeros((256, 4), f32)
            for n0 in range(0, N, TK):
                for i, act in strided(tid, 256, TT * TK):
                    r, c = i // TK, i % TK
                    t, nn = t0 + r, n0 + c
                    ok = act & (t < T) & (nn < N)
                    ds.st(r * (TK + 1) + c, np.where(ok, bf16_to_f32(dy.read(t.astype(np.int64) * N + nn, ok)), f32(0)), act)
                for i, act in strided(tid, 256, TK * TN):
                    r, c = i // TN, i % TN
                    nn, kk = n0 + r, bx * TN + c
                    ok = act & (nn < N) & (kk < K)
                    ws.st(r * (TN + 1) + c, np.where(ok, nf4_at(packed, absmax, nn.astype(np.int64) * K + kk, ok), f32(0)), act)
                ds.barrier(); ws.barrier()
                for c in range(TK):
                    w = ws.ld(c * (TN + 1) + tx)
                    for j in range(4):
                        acc[:, j] = fma(ds.ld((ty + 4 * j) * (TK + 1) + c), w, acc[:, j])
                ds.barrier(); ws.barrier()
            live = ~(k >= K)
            for j in range(4):
                t = t0 + ty + 4 * j
                dx.write(t.astype(np.int64) * K + k, bf16_bits(acc[:, j]), live & (t < T))


# ---- mma.cuh
BM, BN, BR, PAD = 64, 64, 32, 8
ROW = BR + PAD  # TileRow: bf16[40]


def stage_a(ctx, As, a, m0, r0, M, R, tid, nthreads, stats):  # mma.cuh:44
    a_aligned = True  # cudaMalloc base; a is always a whole CudaSlice here
    if m0 + BM <= M and r0 + BR <= R and R % 8 == 0 and a_aligned:
        stats["A16"] += 1
        for i, act in strided(tid, nthreads, BM * BR // 8):
            m, c = i // (BR // 8), (i % (BR // 8)) * 8
            v = a.vread((m0 + m).astype(np.int64) * R + r0 + c, 8, act)
            pack8_store(As, m * ROW + c, v, act)
        return
    stats["Aelem"] += 1
    for i, act in strided(tid, nthreads, BM * BR):
        m, r = i // BR, i % BR
        ok = act & (m0 + m < M) & (r0 + r < R)
        As.st(m * ROW + r, np.where(ok, a.read((m0 + m).astype(np.int64) * R + r0 + r, ok), bf16_bits(f32(0))), act)


class Nf4Rows:  # nf4.cu:204 -- B[r, c] = W[c, r], W [C, R]
    def __init__(self, packed, absmax, R):
        self.packed, self.absmax, self.R = packed, absmax, R

    def __call__(self, r, c, mask):
        return nf4_at(self.packed, self.absmax, c.astype(np.int64) * self.R + r, mask)

    def stage(self, Bs, r0, n0, R_, N, tid, nthreads):
        if n0 + BN > N or r0 + BR > R_ or R_ % 32 != 0:
            return False
        for i, act in strided(tid, nthreads, BN * 2 - (1 if "uninit" in INJECT else 0)):
            n, h = i // 2, (i % 2) * 16
            v = nf4_decode16(self.packed, self.absmax, (n0 + n).astype(np.int64) * R_ + r0 + h, act)
            pack8_store(Bs, n * ROW + h, v[:, 0:8], act)
            pack8_store(Bs, n * ROW + h + 8, v[:, 8:16], act)
        return True


class Nf4Cols:  # nf4.cu:224 -- B[r, c] = W[r, c], W [R, C]
    def __init__(self, packed, absmax, C):
        self.packed, self.absmax, self.C = packed, absmax, C

    def __call__(self, r, c, mask):
        return nf4_at(self.packed, self.absmax, r.astype(np.int64) * self.C + c, mask)

    def stage(self, Bs, r0, n0, R, C_, tid, nthreads):
        if n0 + BN > C_ or r0 + BR > R or C_ % 16 != 0:
            return False
        for i, act in strided(tid, nthreads, BR * 4):
            r, c = i // 4, (i % 4) * 16
            v = nf4_decode16(self.packed, self.absmax, (r0 + r).astype(np.int64) * C_ + n0 + c, act)
            for j in range(16):
                Bs.st((c + j) * ROW + r, v[:, j], act)
        return True


class StoreBias:  # nf4.cu:243
    def __init__(self, out, bias, C):
        self.out, self.bias, self.C = out, bias, C

    def __call__(self, m, c, v, mask):
        b = bf16_to_f32(self.bias.read(c, mask)) if self.bias is not None else f32(0)
        self.out.write(m.astype(np.int64) * self.C + c, bf16_bits((v + b).astype(f32)), mask)


def mma_gemm(ctx, grid, block, N_FAST, a, load_b, store, M, N, R, stats):  # mma.cuh:63
    nthreads = block[0]
    assert block == (128, 1, 1)
    tid = np.arange(nthreads)
    lane, warp = tid % 32, tid // 32
    g, q = lane // 4, lane % 4
    wm, wn = (warp // 2) * 32, (warp % 2) * 32
    W = nthreads // 32
    for by in range(grid[1]):
        for bx in range(grid[0]):
            As = Smem(ctx, "As", BM * ROW, np.uint16, tid)
            Bs = Smem(ctx, "Bs", BN * ROW, np.uint16, tid)
            m0, n0 = by * BM, bx * BN
            acc = np.zeros((nthreads, 2, 4, 4), f32)
            for r0 in range(0, R, BR):
                stage_a(ctx, As, a, m0, r0, M, R, tid, nthreads, stats)
                if not load_b.stage(Bs, r0, n0, R, N, tid, nthreads):
                    stats["Belem"] += 1
                    for i, act in strided(tid, nthreads, BN * BR):
                        n = i % BN if N_FAST else i // BR
                        r = i // BN if N_FAST else i % BR
                        ok = act & (n0 + n < N) & (r0 + r < R)
                        val = np.where(ok, load_b(r0 + r, n0 + n, ok), f32(0))
                        Bs.st(n * ROW + r, bf16_bits(val), act)
                else:
                    stats["Bstage"] += 1
                As.barrier(); Bs.barrier()
                for k in range(0, BR, 16):
                    af = np.zeros((nthreads, 2, 4), np.uint32)
                    bfr = np.zeros((nthreads, 4, 2), np.uint32)
                    for mi in range(2):
                        row = wm + mi * 16 + g
                        af[:, mi, 0] = ld_pair(As, row * ROW + k + 2 * q)
                        af[:, mi, 1] = ld_pair(As, (row + 8) * ROW + k + 2 * q)
                        af[:, mi, 2] = ld_pair(As, row * ROW + k + 2 * q + 8)
                        af[:, mi, 3] = ld_pair(As, (row + 8) * ROW + k + 2 * q + 8)
                        if "swapA" in INJECT:
                            af[:, mi, [1, 2]] = af[:, mi, [2, 1]]
                    for ni in range(4):
                        col = wn + ni * 8 + g
                        bfr[:, ni, 0] = ld_pair(Bs, col * ROW + k + 2 * q)
                        bfr[:, ni, 1] = ld_pair(Bs, col * ROW + k + 2 * q + 8)
                        if "swapB" in INJECT:
                            bfr[:, ni, [0, 1]] = bfr[:, ni, [1, 0]]
                    for mi in range(2):
                        for ni in range(4):
                            c = acc[:, mi, ni, :].reshape(W, 32, 4)
                            d = mma_bf16(c, af[:, mi, :].reshape(W, 32, 4), bfr[:, ni, :].reshape(W, 32, 2))
                            acc[:, mi, ni, :] = d.reshape(nthreads, 4)
                As.barrier(); Bs.barrier()
            for mi in range(2):
                for ni in range(4):
                    for h in range(4):
                        m = m0 + wm + mi * 16 + g + (8 if h >= 2 else 0)
                        n = n0 + wn + ni * 8 + 2 * q + (h & 1)
                        mlim = M - 1 if "under" in INJECT else M
                        store(m, n, acc[:, mi, ni, h], (m < mlim) & (n < N))


def k_nf4_gemm_fwd_mma(ctx, grid, block, y, x, packed, absmax, bias, T, N, K, stats):
    mma_gemm(ctx, grid, block, False, x, Nf4Rows(packed, absmax, K), StoreBias(y, bias, N), T, N, K, stats)


def k_nf4_gemm_bwd_input_mma(ctx, grid, block, dx, dy, packed, absmax, T, N, K, stats):
    mma_gemm(ctx, grid, block, True, dy, Nf4Cols(packed, absmax, K), StoreBias(dx, None, K), T, K, N, stats)


GEMV_MAX_M = 16


def k_nf4_gemv(ctx, grid, block, y, x, packed, absmax, bias, M, N, K, stats):
    G, B = grid[0], block[0]
    gt = np.repeat(np.arange(G, dtype=np.int64), B) * B + np.tile(np.arange(B), G)
    n = gt // 32
    lane = np.tile(np.arange(B), G) % 32
    live = ~(n >= N)
    row = n * K
    nt = len(gt)
    acc = np.zeros((nt, GEMV_MAX_M), f32)
    if K % 32 == 0:  # the bases are whole allocations here: 16-byte aligned
        stats["gemv16B"] += 1
        k0 = lane.astype(np.int64) * 32
        while True:
            act = live & (k0 < K)
            if not act.any():
                break
            byts = packed.vread((row + k0) // 2, 16, act)  # uint4
            s = absmax.read((row + k0) >> 6, act)
            straddle = act & (((row + k0) >> 6) != ((row + k0 + 31) >> 6))
            if straddle.any():
                ctx.flag("gemv: 32 weights straddle a 64-block", "")
            w = np.zeros((nt, 32), f32)
            for j in range(16):
                b = byts[:, j].astype(np.uint32)  # (words[j/4] >> 8*(j%4)) & 0xff = byte j
                w[:, 2 * j] = TABLE[b >> 4] * s
                w[:, 2 * j + 1] = TABLE[b & 15] * s
            for m in range(GEMV_MAX_M):
                if m < M:
                    ssum = np.zeros(nt, f32)
                    for qq in range(4):
                        v = x.vread(m * K + k0 + 8 * qq, 8, act)  # xv[q]: uint4 of 8 bf16
                        for j in range(8):
                            ssum = fma(w[:, 8 * qq + j], bf16_to_f32(v[:, j]), ssum)
                    acc[:, m] = np.where(act, (acc[:, m] + ssum).astype(f32), acc[:, m])
            k0 = k0 + 32 * 32
    else:
        stats["gemvElem"] += 1
        k = lane.astype(np.int64).copy()
        while True:
            act = live & (k < K)
            if not act.any():
                break
            w = nf4_at(packed, absmax, row + k, act)
            for m in range(GEMV_MAX_M):
                if m < M:
                    acc[:, m] = np.where(act, fma(w, bf16_to_f32(x.read(m * K + k, act)), acc[:, m]), acc[:, m])
            k = k + 32
    b = bf16_to_f32(bias.read(n, live)) if bias is not None else np.zeros(nt, f32)
    for m in range(GEMV_MAX_M):
        if m < M:
            v = warp_sum(ctx, acc[:, m].copy(), live)
            y.write(m * N + n, bf16_bits((v + b).astype(f32)), live & (lane == 0))


# ----------------------------------------------------------------------------- launch configs (Rust)
def blocks_for(n):  # mod.rs:288
    return ((max(-(-n // 256), 1), 1, 1), (256, 1, 1))


def gemm_tiles(rows, cols):  # mod.rs gemm_tiles
    return ((-(-cols // 64), -(-rows // 16), 1), (64, 4, 1))


def mma_tiles(rows, cols):  # mod.rs:184
    return ((-(-cols // 64), -(-rows // 64), 1), (128, 1, 1))
