"""The loss/LoRA emulator's (scripts/emulate_ce_lora.py) kernels: the mma_gemm of kernels/mma.cuh,
kernels/cross_entropy.cu and kernels/lora.cu (the simple kernels and the tiled ones) line by line, and
the launch configurations and wrappers of src/engine/cuda/{mod,ops,head}.rs and, for LoRA, lora.rs
(both LoraPath). INJECT holds the deliberately broken variants chosen with --inject, COVER the
staging paths taken, LAUNCHES every launch emulated."""
from collections import Counter

import numpy as np

from . import ce_lora_machine as machine
from .ce_lora_machine import F32, Launch, block_max, block_sum, ld_pair, mma_bf16
from .gpu import expf_fast, fma, logf, round_bf16, shfl_xor

INJECT = set()
COVER = Counter()  # which staging paths ran (blocks x slices)


# ----------------------------------------------------------------------------------------------
# kernels/mma.cuh
# ----------------------------------------------------------------------------------------------
BM, BN, BR, PAD = 64, 64, 32, 8
ROW = BR + PAD  # TileRow stride (bf16 elements)


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
        self.out.st(L, m * self.N + n, round_bf16(v), mask)


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
            Bs.st(n * ROW + r, round_bf16(v), act)
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
        dlogits.st(L, i * V + v, round_bf16(val), act)
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
        ov, oi = shfl_xor(bv, o, axis=1), shfl_xor(bi, o, axis=1)
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
    y.st(L, i, round_bf16(fma(F32(scale), s, yi)), act)


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
    dx.st(L, i, round_bf16(fma(F32(scale), s, di)), act)


# ----------------------------------------------------------------------------------------------
# kernels/lora.cu, the tiled variants (LoraPath::Tiled, the default; the kernels above: simple)
# ----------------------------------------------------------------------------------------------
LT_THREADS, LT_ROWS, LT_CHUNK, LT_MAX_R = 256, 16, 64, 64


class TileSplit:
    """rg = ceil(r / 4) rank groups, slices = 256 / (4 rg); tx, ty, s per thread ([B, T]); threads
    with s >= slices (past slices * 4 * rg) are idle in the sums."""

    def __init__(self, L, r):
        tid = np.broadcast_to(L.tid, (L.B, L.T))
        self.rg = (r + 3) // 4
        self.slices = LT_THREADS // (4 * self.rg)
        self.tx = tid % self.rg
        self.ty = (tid // self.rg) % 4
        self.s = tid // (4 * self.rg)


def slice_loop(sp):
    """for (jj = sp.s; jj < LT_CHUNK; jj += sp.slices) under if (sp.s < sp.slices): the per-thread
    indices [B, T, it] and which iterations run."""
    step = sp.slices - 1 if "lt_step" in INJECT else sp.slices
    JJ = sp.s[..., None] + step * np.arange(-(-LT_CHUNK // step))
    return JJ, (sp.s < sp.slices)[..., None] & (JJ < LT_CHUNK)


def tile_fma(acc, a, b, act):
    """for i, q: acc[i][q] += a[i] * b[q] (contracted), one slice-loop iteration after another."""
    for it in range(act.shape[-1]):
        m = act[..., it]
        for i in range(4):
            for q in range(4):
                acc[i, q] = np.where(m, fma(a[i][..., it], b[q][..., it], acc[i, q]), acc[i, q])


def sum_slices(L, part, acc, sp, r, emit):
    assert L.T == LT_THREADS
    rp = 4 * sp.rg
    live = sp.s < sp.slices
    if "ss_idle" in INJECT:
        live = np.ones_like(live)
    for i in range(4):
        for q in range(4):
            part.st((sp.s * LT_ROWS + sp.ty * 4 + i) * rp + sp.tx * 4 + q, acc[i, q], live)
    if "ss_nosync" not in INJECT:
        L.sync()
    S = np.arange(sp.slices)
    for o, act in L.strided(LT_ROWS * r):
        row, c = o // r, o % r
        pv = part.ld((S * LT_ROWS + row[..., None]) * rp + c[..., None], act[..., None])
        total = np.zeros((L.B, L.T), F32)
        for s in range(sp.slices):
            total = (total + pv[..., s]).astype(F32)
        emit(row, c, total, act)


def row_proj_tiled(L, out, u, m, jr, T, J, r):
    us = L.smem("us", (LT_CHUNK, LT_ROWS + 1))  # [j][token]
    ms = L.smem("ms", (LT_CHUNK, LT_MAX_R + 1))  # [j][rank]
    part = L.smem("part", (LT_THREADS * 16,))
    sp = TileSplit(L, r)
    t0, rp = L.bx * LT_ROWS, 4 * sp.rg
    acc = np.zeros((4, 4, L.B, L.T), F32)
    for j0 in range(0, J, LT_CHUNK):
        for i, act in L.strided(LT_ROWS * LT_CHUNK):
            row, jj = i // LT_CHUNK, i % LT_CHUNK
            t, j = t0 + row, j0 + jj
            inb = (t < T) & (j < J)
            us.st(jj * (LT_ROWS + 1) + row, np.where(inb, u.ld(L, t * J + j, act & inb), F32(0)), act)
        for i, act in L.strided(rp * LT_CHUNK):
            c = i % rp if jr else i // LT_CHUNK
            jj = i // rp if jr else i % LT_CHUNK
            j = j0 + jj
            inb = (j < J) if "lt_pad" in INJECT else (c < r) & (j < J)
            idx = j * r + c if jr else c * J + j
            ms.st(jj * (LT_MAX_R + 1) + c, np.where(inb, m.ld(L, idx, act & inb), F32(0)), act)
        L.sync()
        JJ, act = slice_loop(sp)
        a = [us.ld(JJ * (LT_ROWS + 1) + (sp.ty * 4 + i)[..., None], act) for i in range(4)]
        b = [ms.ld(JJ * (LT_MAX_R + 1) + (sp.tx * 4 + q)[..., None], act) for q in range(4)]
        tile_fma(acc, a, b, act)
        L.sync()

    def emit(row, c, total, act):
        t = t0 + row
        out.st(L, t * r + c, total, act & (t < T))

    sum_slices(L, part, acc, sp, r, emit)


def lora_xa_tiled(L, xa, x, a, T, K, r):
    row_proj_tiled(L, xa, x, a, False, T, K, r)


def lora_g_tiled(L, g, dy, b, T, N, r):
    row_proj_tiled(L, g, dy, b, True, T, N, r)


def token_sum_tiled(L, out, rank_major, u, w, T, U, r, scale):
    us = L.smem("us", (LT_CHUNK, LT_ROWS + 1))  # [token][column]
    ws = L.smem("ws", (LT_CHUNK, LT_MAX_R + 1))  # [token][rank]
    part = L.smem("part", (LT_THREADS * 16,))
    sp = TileSplit(L, r)
    col0, rp = L.bx * LT_ROWS, 4 * sp.rg
    acc = np.zeros((4, 4, L.B, L.T), F32)
    for t0 in range(0, T, LT_CHUNK):
        for i, act in L.strided(LT_CHUNK * LT_ROWS):
            tt, cc = i // LT_ROWS, i % LT_ROWS
            t, col = t0 + tt, col0 + cc
            inb = (t < T) & (col < U)
            us.st(tt * (LT_ROWS + 1) + cc, np.where(inb, u.ld(L, t * U + col, act & inb), F32(0)), act)
        for i, act in L.strided(LT_CHUNK * rp):
            tt, c = i // rp, i % rp
            t = t0 + tt
            inb = (t < T) if "lt_pad" in INJECT else (t < T) & (c < r)
            ws.st(tt * (LT_MAX_R + 1) + c, np.where(inb, w.ld(L, t * r + c, act & inb), F32(0)), act)
        L.sync()
        TT, act = slice_loop(sp)
        a = [us.ld(TT * (LT_ROWS + 1) + (sp.ty * 4 + i)[..., None], act) for i in range(4)]
        b = [ws.ld(TT * (LT_MAX_R + 1) + (sp.tx * 4 + q)[..., None], act) for q in range(4)]
        tile_fma(acc, a, b, act)
        L.sync()

    def emit(row, c, total, act):
        col = col0 + row
        act = act & (col < U)
        idx = c * U + col if rank_major else col * r + c
        old = out.ld(L, idx, act)
        out.st(L, idx, fma(F32(scale), total, old), act)

    sum_slices(L, part, acc, sp, r, emit)


def lora_db_tiled(L, db, dy, xa, T, N, r, scale):
    token_sum_tiled(L, db, False, dy, xa, T, N, r, scale)


def lora_da_tiled(L, da, g, x, T, K, r, scale):
    token_sum_tiled(L, da, True, x, g, T, K, r, scale)


def rank_expand_tiled(L, y, p, m, cn, T, N, r, scale):
    assert L.T == LT_THREADS
    ps = L.smem("ps", (LT_ROWS, LT_MAX_R))
    ms = L.smem("ms", (LT_CHUNK, LT_MAX_R + 1))  # [column][rank]
    n0, t0 = L.bx * LT_CHUNK, L.by * LT_ROWS
    for i, act in L.strided(LT_ROWS * r):
        tt, c = i // r, i % r
        t = t0 + tt
        inb = t < T
        ps.st(tt * LT_MAX_R + c, np.where(inb, p.ld(L, t * r + c, act & inb), F32(0)), act)
    for i, act in L.strided(LT_CHUNK * r):
        nn = i % LT_CHUNK if cn else i // r
        c = i // LT_CHUNK if cn else i % r
        n = n0 + nn
        inb = n < N
        idx = c * N + n if cn else n * r + c
        ms.st(nn * (LT_MAX_R + 1) + c, np.where(inb, m.ld(L, idx, act & inb), F32(0)), act)
    L.sync()
    tid = np.broadcast_to(L.tid, (L.B, L.T))
    nn = tid % LT_CHUNK
    n = n0 + nn
    live = n < N  # if (n >= N) return;
    C = np.arange(r)
    for k0 in range(0, LT_ROWS, LT_THREADS // LT_CHUNK):  # tt = threadIdx.x / 64; tt < 16; tt += 4
        tt = tid // LT_CHUNK + k0
        t = t0 + tt
        if "re_tail" not in INJECT:
            live = live & (t < T)  # if (t >= T) break; (t grows with the loop)
        pv = ps.ld(tt[..., None] * LT_MAX_R + C, live[..., None])
        mv = ms.ld(nn[..., None] * (LT_MAX_R + 1) + C, live[..., None])
        s = np.zeros((L.B, L.T), F32)
        for c in range(r):
            s = fma(pv[..., c], mv[..., c], s)
        i = t * N + n
        yi = y.ld(L, i, live)
        y.st(L, i, round_bf16(fma(F32(scale), s, yi)), live)


def lora_add_tiled(L, y, xa, b, T, N, r, scale):
    rank_expand_tiled(L, y, xa, b, False, T, N, r, scale)


def lora_dx_tiled(L, dx, g, a, T, K, r, scale):
    rank_expand_tiled(L, dx, g, a, True, T, K, r, scale)


# ----------------------------------------------------------------------------------------------
# Launch configurations (src/engine/cuda/mod.rs, ops.rs, lora.rs) and the wrappers
# ----------------------------------------------------------------------------------------------
def blocks_for(n):
    return ((max(-(-n // 256), 1), 1, 1), 256)


def block_per_row(rows):
    return ((rows, 1, 1), 256)


def mma_tiles(rows, cols):
    return ((-(-cols // 64), -(-rows // 64), 1), 128)


def per_16(n):
    return ((max(-(-n // 16), 1), 1, 1), 256)


# src/engine/cuda/lora.rs
TILED, SIMPLE = "tiled", "simple"  # LoraPath
LORA_KERNELS = {SIMPLE: (lora_xa, lora_add, lora_g, lora_db, lora_da, lora_dx),
                TILED: (lora_xa_tiled, lora_add_tiled, lora_g_tiled, lora_db_tiled, lora_da_tiled, lora_dx_tiled)}


def expand_cfg(path, t, n):
    if path == SIMPLE:
        return blocks_for(t * n)
    return ((max(-(-n // 64), 1), max(-(-t // 16), 1), 1), 256)


MAX_RANK = 64
LAUNCHES = []  # (kernel, grid, block, static shared bytes, problems)


def run(kernel, cfg, outs, *args):
    grid, block = cfg
    L = Launch(kernel.__name__, grid, block)
    for b in list(machine.ALL_BUFS):
        b.begin()
    kernel(L, *args)
    L.wc = {id(b): b.wcount.copy() for b in outs}  # this launch's write counts per output
    assert L.static_smem <= 48 * 1024, "static shared memory over 48 KiB"
    LAUNCHES.append((kernel.__name__, grid, block, L.static_smem, dict(L.errors)))
    return L


class LoraAt:
    def __init__(self, a, b, inp, out):
        self.a, self.b, self.inp, self.out = a, b, inp, out


def w_lora_fwd(y, xa, x, w, at, t, r, scale, path=TILED):
    """Cuda::lora_fwd_via."""
    k, n = at.inp, at.out
    assert x.data.size >= t * k and y.data.size >= t * n and xa.data.size >= t * r
    assert at.b == at.a + r * k and at.b + n * r <= w.data.size, "lora_fwd: adapter out of range"
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is over the {MAX_RANK} the GPU kernels take")
    xa_k, add_k = LORA_KERNELS[path][0:2]
    a, b = w.ptr(at.a, at.b), w.ptr(at.b, at.b + n * r)
    l1 = run(xa_k, per_16(t), [xa], xa.ptr(), x.ptr(), a, t, k, r)
    l2 = run(add_k, expand_cfg(path, t, n), [y], y.ptr(), xa.ptr(), b, t, n, r, scale)
    return l1, l2


def w_lora_bwd(dx, grad, g, dy, x, xa, w, at, t, r, scale, path=TILED):
    """Cuda::lora_bwd_via."""
    k, n = at.inp, at.out
    assert dx.data.size >= t * k and x.data.size >= t * k and dy.data.size >= t * n
    assert xa.data.size >= t * r and g.data.size >= t * r
    assert at.b == at.a + r * k and at.b + n * r <= min(w.data.size, grad.data.size), "lora_bwd: adapter out of range"
    if r > MAX_RANK:
        raise ValueError(f"LoRA rank {r} is over the {MAX_RANK} the GPU kernels take")
    g_k, db_k, da_k, dx_k = LORA_KERNELS[path][2:6]
    a, b = w.ptr(at.a, at.b), w.ptr(at.b, at.b + n * r)
    da, db = grad.ptr(at.a, at.b), grad.ptr(at.b, at.b + n * r)  # split_at_mut(at.b), slices
    l1 = run(g_k, per_16(t), [g], g.ptr(), dy.ptr(), b, t, n, r)
    l2 = run(db_k, per_16(n), [grad], db, dy.ptr(), xa.ptr(), t, n, r, scale)
    l3 = run(da_k, per_16(k), [grad], da, g.ptr(), x.ptr(), t, k, r, scale)
    l4 = run(dx_k, expand_cfg(path, t, k), [dx], dx.ptr(), g.ptr(), a, t, k, r, scale)
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
