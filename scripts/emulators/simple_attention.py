"""The simple-kernels emulator's (scripts/emulate_simple_kernels.py) kernels/attention.cu, the simple
(non-tiled) attention: attention_fwd, attention_decode, attention_bwd_rowdot, attention_bwd_dq and
attention_bwd_dkv with attention_probs / attention_mix / warp_dot, lane by lane, and their wrappers
(src/engine/cuda/attention.rs)."""
import numpy as np

from . import simple_machine as machine
from .gpu import expf_fast, fma, logf, round_bf16, rsqrtf
from .simple_machine import F32, I64, _bc, block_max, block_sum, blocks_for, ld, launch, st, strided, warp_sum

# H100 opt-in shared memory per block (227 KiB) less the largest static shared memory of the three
# kernels that take dynamic shared memory (attention_fwd / decode: part 4 KiB + scratch 128 B).
ATTN_SMEM = 232448 - (4 * 256 * 4 + 32 * 4)


# ----------------------------------------------------------------------------------------------
# attention.cu
# ----------------------------------------------------------------------------------------------
MIX_MAX_HD = 256


def warp_dot(ctx, a, abase, b, bbase, hd, act):
    s = ctx.zeros()
    for c in range(MIX_MAX_HD // 32):  # #pragma unroll; chunks past hd are idle in every lane
        if 32 * c >= hd:
            break
        i = ctx.lane + 32 * c
        m = act & (i < hd)
        x = ld(ctx, a, abase + i, m)
        y = ld(ctx, b, bbase + i, m)
        s = np.where(m, s + x * y, s).astype(F32)  # fma(x, y, s): x*y exact (bf16 x bf16)
    return warp_sum(ctx, s, act)


def kvh_of(h, heads, kv_heads):
    if "kvh_mod" in machine.INJECT:
        return h % kv_heads
    return h // (heads // kv_heads)


def attention_probs(ctx, p, q, qbase, k, start, n, kvh, kv_heads, hd, scratch):
    scale = rsqrtf(F32(hd))
    lane, warp, warps = ctx.lane, ctx.warp, ctx.warps
    for j, act in strided(ctx, warp, warps, n):
        s = warp_dot(ctx, q, qbase, k, ((start + j) * kv_heads + kvh) * hd, hd, act)
        p.st(j, s * scale, act & (lane == 0))
    if "probs_nosync" not in machine.INJECT:
        ctx.sync()
    m = np.full(ctx.shape, -np.inf, F32)
    for j, act in strided(ctx, ctx.tid, ctx.NT, n):
        m = np.where(act, np.fmax(m, p.ld(j, act)), m).astype(F32)
    mx = block_max(ctx, m, scratch)
    sm = ctx.zeros()
    for j, act in strided(ctx, ctx.tid, ctx.NT, n):
        p.st(j, expf_fast(p.ld(j, act) - mx, wide=True), act)
        sm = np.where(act, sm + p.ld(j, act), sm).astype(F32)
    sm = block_sum(ctx, sm, scratch)
    for j, act in strided(ctx, ctx.tid, ctx.NT, n):
        p.st(j, p.ld(j, act) / sm, act)
    ctx.sync()
    return (mx + logf(sm, wide=True)).astype(F32)


def attention_mix(ctx, out, obase, w, m, start, n, kvh, kv_heads, hd):
    part = ctx.shared("part", 4 * MIX_MAX_HD)  # __shared__ float part[4][MIX_MAX_HD]
    lane, warp, warps = ctx.lane, ctx.warp, ctx.warps
    C = [c for c in range(MIX_MAX_HD // 32) if 32 * c < hd]
    acc = [ctx.zeros() for _ in C]
    for j, act in strided(ctx, warp, warps, n):
        row = ((start + j) * kv_heads + kvh) * hd
        wj = w.ld(j, act)
        for c in C:
            mm = act & (lane + 32 * c < hd)
            r = ld(ctx, m, row + lane + 32 * c, mm)
            acc[c] = np.where(mm, fma(wj, r, acc[c], exact=True), acc[c]).astype(F32)
    for c in C:
        part.st(warp * MIX_MAX_HD + lane + 32 * c, acc[c], lane + 32 * c < hd)
    if "mix_nosync" not in machine.INJECT:
        ctx.sync()
    for i, act in strided(ctx, ctx.tid, ctx.NT, hd):
        s = ctx.zeros()
        for kk in range(warps):
            s = (s + part.ld(kk * MIX_MAX_HD + i, act)).astype(F32)
        st(ctx, out, obase + i, round_bf16(s), act)


def k_attention_fwd(ctx, out, lse, q, k, v, seq_start, heads, kv_heads, hd):
    p = ctx.dyn()
    scratch = ctx.shared("scratch", 32)
    b = ctx.bid
    t, h = b // heads, b % heads
    start = ld(ctx, seq_start, t)
    n = t - start + (0 if "causal_off1" in machine.INJECT else 1)
    kvh = kvh_of(h, heads, kv_heads)
    row_lse = attention_probs(ctx, p, q, b * hd, k, start, n, kvh, kv_heads, hd, scratch)
    st(ctx, lse, b, row_lse, ctx.tid == 0)
    attention_mix(ctx, out, b * hd, p, v, start, n, kvh, kv_heads, hd)


def k_attention_decode(ctx, out, q, k, v, key_start, key_len, heads, kv_heads, hd):
    p = ctx.dyn()
    scratch = ctx.shared("scratch", 32)
    b = ctx.bid
    bb, h = b // heads, b % heads
    start, n = ld(ctx, key_start, bb), ld(ctx, key_len, bb)
    kvh = kvh_of(h, heads, kv_heads)
    attention_probs(ctx, p, q, b * hd, k, start, n, kvh, kv_heads, hd, scratch)
    attention_mix(ctx, out, b * hd, p, v, start, n, kvh, kv_heads, hd)


def k_attention_bwd_rowdot(ctx, dd, dout, out, rows, hd):
    w = (ctx.bid * ctx.NT + ctx.tid) // 32
    lane = ctx.lane
    ctx.exit(w >= rows)
    s = ctx.zeros()
    for i, act in strided(ctx, lane, 32, hd):
        s = np.where(act, s + ld(ctx, dout, w * hd + i, act) * ld(ctx, out, w * hd + i, act), s).astype(F32)
    s = warp_sum(ctx, s)
    st(ctx, dd, w, s, lane == 0)


def k_attention_bwd_dq(ctx, dq, dout, q, k, v, lse, dd, seq_start, heads, kv_heads, hd):
    ds = ctx.dyn()
    b = ctx.bid
    t, h = b // heads, b % heads
    start = ld(ctx, seq_start, t)
    n = t - start + 1
    kvh = kvh_of(h, heads, kv_heads)
    scale = rsqrtf(F32(hd))
    row_lse, row_d = ld(ctx, lse, b), ld(ctx, dd, b)
    lane, warp, warps = ctx.lane, ctx.warp, ctx.warps
    for j, act in strided(ctx, warp, warps, n):
        kv_at = ((start + j) * kv_heads + kvh) * hd
        s = warp_dot(ctx, q, b * hd, k, kv_at, hd, act)
        dp = warp_dot(ctx, dout, b * hd, v, kv_at, hd, act)
        # __expf(s * scale - row_lse): contracted to fma(s, scale, -row_lse)
        val = (expf_fast(fma(s, scale, -row_lse, exact=True), wide=True) * (dp - row_d)).astype(F32) * scale
        ds.st(j, val, act & (lane == 0))
    ctx.sync()
    attention_mix(ctx, dq, b * hd, ds, k, start, n, kvh, kv_heads, hd)


BWD_KV_WARPS, MAX_HD_PER_LANE = 4, 8


def k_attention_bwd_dkv(ctx, dk, dv, dout, q, k, v, lse, dd, seq_start, T, heads, kv_heads, hd):
    part = ctx.shared("part", BWD_KV_WARPS * 2 * MAX_HD_PER_LANE * 32)
    b = ctx.bid
    s, kvh = b // kv_heads, b % kv_heads
    start = ld(ctx, seq_start, s)
    group, lane, warp = heads // kv_heads, ctx.lane, ctx.warp
    scale = rsqrtf(F32(hd))
    kvb = b * hd
    C = [c for c in range(MAX_HD_PER_LANE) if 32 * c < hd]
    dk_acc = [ctx.zeros() for _ in C]
    dv_acc = [ctx.zeros() for _ in C]
    pair = _bc(ctx, warp + (group if "dkv_self" in machine.INJECT else 0), I64)
    alive = ctx.active.copy()
    while True:
        t = s + pair // group
        h = kvh * group + pair % group
        brk = t >= T
        brk = brk | (~brk & (ld(ctx, seq_start, t, alive & ~brk) != start))  # || short-circuits
        alive = alive & ~brk
        if not alive.any():
            break
        row = t * heads + h
        sc, dp = ctx.zeros(), ctx.zeros()
        for i, act in strided(ctx, lane, 32, hd):
            act = act & alive
            sc = np.where(act, sc + ld(ctx, q, row * hd + i, act) * ld(ctx, k, kvb + i, act), sc).astype(F32)
            dp = np.where(act, dp + ld(ctx, dout, row * hd + i, act) * ld(ctx, v, kvb + i, act), dp).astype(F32)
        sc = warp_sum(ctx, sc, alive)
        dp = warp_sum(ctx, dp, alive)
        p = expf_fast(fma(sc, scale, -ld(ctx, lse, row, alive), exact=True), wide=True)  # fma(sc, scale, -lse[row])
        dsv = (p * (dp - ld(ctx, dd, row, alive))).astype(F32) * scale
        for c in C:
            i = lane + 32 * c
            mm = alive & (i < hd)
            dk_new = fma(dsv, ld(ctx, q, row * hd + i, mm), dk_acc[c], exact=True)
            dv_new = fma(p, ld(ctx, dout, row * hd + i, mm), dv_acc[c], exact=True)
            dk_acc[c] = np.where(mm, dk_new, dk_acc[c]).astype(F32)
            dv_acc[c] = np.where(mm, dv_new, dv_acc[c]).astype(F32)
        pair = pair + BWD_KV_WARPS
    W = MAX_HD_PER_LANE * 32
    for c in C:
        i = lane + 32 * c
        part.st((warp * 2 + 0) * W + i, dk_acc[c], i < hd)
        part.st((warp * 2 + 1) * W + i, dv_acc[c], i < hd)
    ctx.sync()
    for i, act in strided(ctx, ctx.tid, ctx.NT, hd):
        a, bsum = ctx.zeros(), ctx.zeros()
        for w in range(BWD_KV_WARPS):
            a = (a + part.ld((w * 2 + 0) * W + i, act)).astype(F32)
            bsum = (bsum + part.ld((w * 2 + 1) * W + i, act)).astype(F32)
        st(ctx, dk, b * hd + i, round_bf16(a), act)
        st(ctx, dv, b * hd + i, round_bf16(bsum), act)


# Wrappers (src/engine/cuda/attention.rs). Blocks run in batches, longest rows first (blocks are
# independent; batching only bounds numpy memory and the lock-step loop lengths).
def _order_by(nrow):
    return np.argsort(-np.asarray(nrow), kind="stable")


def smem_bytes(max_len):
    return (max_len - (1 if "smem_short" in machine.INJECT else 0)) * 4


def w_attention_fwd_simple(out, lse, q, k, v, seq_start, t, dims, max_len):
    heads, kv_heads, hd = dims
    assert out.n >= t * heads * hd and q.n >= t * heads * hd and seq_start.n >= t
    assert k.n >= t * kv_heads * hd and v.n >= t * kv_heads * hd and lse.n >= t * heads
    assert heads % kv_heads == 0
    if max_len * 4 > ATTN_SMEM or hd > 256:
        raise ValueError("refused")
    launch("attention_fwd", k_attention_fwd, t * heads, 128, smem_bytes(max_len),
           [out, lse, q, k, v, seq_start, heads, kv_heads, hd], order=_order_by(np.repeat(_keys_before(seq_start, t), heads)), batch=768)


def w_attention_rowdot(dd, dout, out, rows, hd):
    assert dd.n >= rows and dout.n >= rows * hd and out.n >= rows * hd
    g, b = blocks_for(rows * (16 if "rowdot_grid" in machine.INJECT else 32))
    launch("attention_bwd_rowdot", k_attention_bwd_rowdot, g, b, 0, [dd, dout, out, rows, hd])


def w_attention_bwd_simple(dq, dk, dv, dd, dout, q, k, v, out, lse, seq_start, t, dims, max_len):
    heads, kv_heads, hd = dims
    rows = t * heads
    if hd > 256 or max_len * 4 > ATTN_SMEM:
        raise ValueError("refused")
    w_attention_rowdot(dd, dout, out, rows, hd)
    launch("attention_bwd_dq", k_attention_bwd_dq, rows, 128, smem_bytes(max_len),
           [dq, dout, q, k, v, lse, dd, seq_start, heads, kv_heads, hd],
           order=_order_by(np.repeat(_keys_before(seq_start, t), heads)), batch=768)
    # dkv: key s of a sequence of length L sees L - (s - s0) queries
    launch("attention_bwd_dkv", k_attention_bwd_dkv, t * kv_heads, 128, 0,
           [dk, dv, dout, q, k, v, lse, dd, seq_start, t, heads, kv_heads, hd],
           order=_order_by(np.repeat(_keys_after(seq_start, t), kv_heads)), batch=768)


def _keys_before(seq_start, t):
    ss = seq_start.buf.data[seq_start.off:seq_start.off + t].astype(I64)
    return np.arange(t) - ss + 1


def _keys_after(seq_start, t):
    ss = seq_start.buf.data[seq_start.off:seq_start.off + t]
    out = np.zeros(t, I64)
    for i in range(t):
        j = i
        while j < t and ss[j] == ss[i]:
            j += 1
        out[i] = j - i
    return out


def w_attention_decode(out, q, k, v, key_start, key_len, b, dims, max_len):
    heads, kv_heads, hd = dims
    assert out.n >= b * heads * hd and q.n >= b * heads * hd and key_start.n >= b and key_len.n >= b
    assert k.n == v.n and k.n % (kv_heads * hd) == 0 and heads % kv_heads == 0
    if max_len * 4 > ATTN_SMEM or hd > 256:
        raise ValueError("refused")
    nl = key_len.buf.data[key_len.off:key_len.off + b]
    launch("attention_decode", k_attention_decode, b * heads, 128, smem_bytes(max_len),
           [out, q, k, v, key_start, key_len, heads, kv_heads, hd], order=_order_by(np.repeat(nl, heads)), batch=768)

