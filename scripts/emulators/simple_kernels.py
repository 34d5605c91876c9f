"""The simple-kernels emulator's (scripts/emulate_simple_kernels.py) kernels/rmsnorm.cu, rope.cu,
swiglu.cu, embedding.cu, elementwise.cu and adamw.cu lane by lane, with the launch configurations of
their Rust wrappers (src/engine/cuda/ops.rs, gemm.rs for add_bias_rows) and AdamStep (src/model/optim.rs),
whose hyper-parameters the adamw wrapper passes."""
import numpy as np

from . import simple_machine as machine
from .gpu import expf_fast, fma, round_bf16, rsqrtf, sincosf
from .simple_machine import F32, F64, I64, View, block_per_row, block_sum, blocks_for, ld, launch, st, strided

SUM_PARTS = 256  # src/engine/mod.rs


# ----------------------------------------------------------------------------------------------
# rmsnorm.cu, rope.cu, swiglu.cu, embedding.cu
# ----------------------------------------------------------------------------------------------
def k_rmsnorm_fwd(ctx, y, rstd, x, w, d, eps):
    scratch = ctx.shared("scratch", 32)
    row = ctx.bid
    ss = ctx.zeros()
    for i, act in strided(ctx, ctx.tid, ctx.NT, d):
        vv = ld(ctx, x, row * d + i, act)
        ss = np.where(act, ss + vv * vv, ss).astype(F32)  # fma(v, v, ss): v*v exact
    tot = block_sum(ctx, ss, scratch)
    if "rms_eps" in machine.INJECT:
        r = rsqrtf(tot / F32(d)) + eps
    else:
        r = rsqrtf(tot / F32(d) + eps)
    st(ctx, rstd, row, r, ctx.tid == 0)
    for i, act in strided(ctx, ctx.tid, ctx.NT, d):
        val = ld(ctx, x, row * d + i, act) * r * ld(ctx, w, i, act)
        st(ctx, y, row * d + i, round_bf16(val), act)


def k_rmsnorm_bwd(ctx, dx, dy, x, w, rstd, d):
    scratch = ctx.shared("scratch", 32)
    row = ctx.bid
    dot = ctx.zeros()
    for i, act in strided(ctx, ctx.tid, ctx.NT, d):
        a = ld(ctx, dy, row * d + i, act) * ld(ctx, w, i, act)  # exact (bf16 x bf16)
        # fma(dy*w, x, dot): (16-bit) x (8-bit) significands: exact in f32 as well
        dot = np.where(act, fma(a, ld(ctx, x, row * d + i, act), dot, exact=True), dot).astype(F32)
    dot = block_sum(ctx, dot, scratch)
    r = ld(ctx, rstd, row)
    c = (r * r * r / F32(d) * dot).astype(F32)
    for i, act in strided(ctx, ctx.tid, ctx.NT, d):
        rw = r * ld(ctx, w, i, act)
        # r*w*dy - c*x: (fsub (fmul rw dy) (fmul c x)) -> fma(rw, dy, -(c*x)) (first DAG-combiner choice)
        val = fma(rw, ld(ctx, dy, row * d + i, act), -(c * ld(ctx, x, row * d + i, act)), exact=True)
        st(ctx, dx, row * d + i, round_bf16(val), act)


def w_rmsnorm_fwd(y, rstd, x, w, t, eps):
    d = w.n
    assert y.n >= t * d and x.n >= t * d and rstd.n >= t
    launch("rmsnorm_fwd", k_rmsnorm_fwd, *block_per_row(t), 0, [y, rstd, x, w, d, F32(eps)])


def w_rmsnorm_bwd(dx, dy, x, w, rstd, t):
    d = w.n
    assert dx.n >= t * d and dy.n >= t * d and x.n >= t * d and rstd.n >= t
    launch("rmsnorm_bwd", k_rmsnorm_bwd, *block_per_row(t), 0, [dx, dy, x, w, rstd, d])


def k_rope_rotate(ctx, x, pos, inv_freq, T, heads, hd, sign):
    half = hd // 2
    kk = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(kk >= T * heads * half)
    i = kk % half
    th = kk // half
    t = th % heads if "rope_pos" in machine.INJECT else th // heads
    angle = ld(ctx, pos, t).astype(F32) * ld(ctx, inv_freq, i)
    s, c = sincosf(angle)
    s = s * sign
    hb = th * hd
    a, b = ld(ctx, x, hb + i), ld(ctx, x, hb + i + half)
    st(ctx, x, hb + i, round_bf16(fma(a, c, -(b * s), exact=True)))  # a*c - b*s -> fma(a, c, -(b*s))
    st(ctx, x, hb + i + half, round_bf16(fma(b, c, a * s, exact=True)))  # b*c + a*s -> fma(b, c, a*s)


def w_rope_rotate(x, pos, inv_freq, t, heads, sign):
    hd = 2 * inv_freq.n
    assert x.n >= t * heads * hd and pos.n >= t
    n = t * heads * hd // 2
    launch("rope_rotate", k_rope_rotate, *blocks_for(n), 0, [x, pos, inv_freq, t, heads, hd, F32(sign)])


def k_swiglu_fwd(ctx, out, gate, up, n):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    g = ld(ctx, gate, i)
    val = (g / (F32(1) + expf_fast(-g, wide=True))).astype(F32) * ld(ctx, up, i)
    st(ctx, out, i, round_bf16(val))


def k_swiglu_bwd(ctx, dgate, dup, dout, gate, up, n):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    g, u, d = ld(ctx, gate, i), ld(ctx, up, i), ld(ctx, dout, i)
    s = (F32(1) / (F32(1) + expf_fast(-g, wide=True))).astype(F32)
    # 1 + g * (1 - s) -> fma(g, 1 - s, 1)
    val = (d * u * s).astype(F32) * fma(g, (F32(1) - s), F32(1), exact=True)
    st(ctx, dgate, i, round_bf16(val))
    st(ctx, dup, i, round_bf16(d * g * s))


def w_swiglu_fwd(out, gate, up, n):
    assert out.n >= n and gate.n >= n and up.n >= n
    launch("swiglu_fwd", k_swiglu_fwd, *blocks_for(n), 0, [out, gate, up, n])


def w_swiglu_bwd(dgate, dup, dout, gate, up, n):
    assert dgate.n >= n and dup.n >= n and dout.n >= n and gate.n >= n and up.n >= n
    launch("swiglu_bwd", k_swiglu_bwd, *blocks_for(n), 0, [dgate, dup, dout, gate, up, n])


QNAN_BF16 = round_bf16(np.array([np.uint32(0x7FC00000)]).view(F32))[0]


def k_embedding_fwd(ctx, out, table, tokens, T, d, vocab):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= T * d)
    t, c = i // d, i % d
    tok = ld(ctx, tokens, t).astype(I64)
    ok = (tok >= 0) & (tok < vocab)
    val = np.where(ok, ld(ctx, table, tok * d + c, ok), QNAN_BF16)
    st(ctx, out, i, val)


def w_embedding_fwd(out, table, tokens, t, d):
    vocab = table.n // d
    assert out.n >= t * d and tokens.n >= t and table.n == vocab * d
    launch("embedding_fwd", k_embedding_fwd, *blocks_for(t * d), 0, [out, table, tokens, t, d, vocab])


# ----------------------------------------------------------------------------------------------
# elementwise.cu
# ----------------------------------------------------------------------------------------------
def k_add_bf16(ctx, x, y, n):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    st(ctx, x, i, round_bf16(ld(ctx, x, i) + ld(ctx, y, i)))


def k_cast_f32_bf16(ctx, out, x, n):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    st(ctx, out, i, round_bf16(ld(ctx, x, i)))


def splitmix64(z):
    z = np.asarray(z, np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def k_dropout_bf16(ctx, out, x, seed, p, keep, n):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    ctr = (i if "dropout_ctr" in machine.INJECT else i + 1).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(seed) + ctr * np.uint64(0x9E3779B97F4A7C15))
    u = (z >> np.uint64(11)).astype(F64) * (1.0 / 9007199254740992.0)
    keepit = u.astype(F32) >= p
    xv = ld(ctx, x, i)
    st(ctx, out, i, np.where(keepit, round_bf16(xv * keep), round_bf16(F32(0))))


def k_gather_rows(ctx, out, x, idx, n, d):
    e = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(e >= n * d)
    i, c = e // d, e % d
    st(ctx, out, e, ld(ctx, x, ld(ctx, idx, i).astype(I64) * d + c))


def k_scatter_rows(ctx, out, x, idx, n, d):
    e = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(e >= n * d)
    i, c = e // d, e % d
    st(ctx, out, ld(ctx, idx, i).astype(I64) * d + c, ld(ctx, x, e))


def k_add_bias_rows(ctx, y, bias, T, N):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= T * N)
    st(ctx, y, i, round_bf16(ld(ctx, y, i) + ld(ctx, bias, i % N)))


def w_add(x, y, n):
    assert x.n >= n and y.n >= n
    launch("add_bf16", k_add_bf16, *blocks_for(n), 0, [x, y, n])


def w_cast(out, x, n):
    assert out.n >= n and x.n >= n
    launch("cast_f32_bf16", k_cast_f32_bf16, *blocks_for(n), 0, [out, x, n])


def w_dropout(out, x, seed, p, n):
    p = F32(p)
    assert out.n >= n and x.n >= n and 0 <= p < 1
    keep = F32(F32(1) / (F32(1) - p))
    launch("dropout_bf16", k_dropout_bf16, *blocks_for(n), 0, [out, x, seed, p, keep, n])


def w_gather(out, x, idx, n, d):
    assert out.n >= n * d and idx.n >= n
    launch("gather_rows", k_gather_rows, *blocks_for(n * d), 0, [out, x, idx, n, d])


def w_scatter(out, x, idx, n, d):
    assert x.n >= n * d and idx.n >= n
    launch("scatter_rows", k_scatter_rows, *blocks_for(n * d), 0, [out, x, idx, n, d])


def w_add_bias_rows(y, bias, t, n):
    launch("add_bias_rows", k_add_bias_rows, *blocks_for(t * n), 0, [y, bias, t, n])


# ----------------------------------------------------------------------------------------------
# adamw.cu
# ----------------------------------------------------------------------------------------------
def k_adamw_step(ctx, p, m, v, g, n, gscale, lr, b1, b2, eps, wd, bc1, bc2_sqrt):
    i = ctx.bid * ctx.NT + ctx.tid
    ctx.exit(i >= n)
    one = F32(1)
    gi = ld(ctx, g, i) * gscale  # __fmul_rn
    if "adamw_fma" in machine.INJECT:
        mi = fma(b1, ld(ctx, m, i), (one - b1) * gi, exact=True)
    else:
        mi = (b1 * ld(ctx, m, i)) + ((one - b1) * gi)  # __fadd_rn(__fmul_rn, __fmul_rn)
    vi = (b2 * ld(ctx, v, i)) + (((one - b2) * gi) * gi)
    st(ctx, m, i, mi)
    st(ctx, v, i, vi)
    decay = one - lr * wd
    step = (lr * (mi / bc1)) / ((np.sqrt(vi) / bc2_sqrt) + eps)  # sqrtf: IEEE (prec-sqrt default)
    st(ctx, p, i, (ld(ctx, p, i) * decay) - step)


def k_partial_norms(ctx, parts, x, n):
    scratch = ctx.shared("scratch", 32, F64)
    acc = ctx.zeros(F64)
    stride = ctx.NT if "sumsq_stride" in machine.INJECT else ctx.grid * ctx.NT
    for i, act in strided(ctx, ctx.bid * ctx.NT + ctx.tid, stride, n):
        xi = ld(ctx, x, i, act).astype(F64)
        if "norm_f32" in machine.INJECT:  # the squares in f32: they overflow for |x| > 1.8e19
            acc = np.where(act, fma(xi, xi, acc.astype(F32), exact=True), acc)
        else:  # fma(v, v, acc) in f64; v * v is exact, so the same as acc + v * v
            acc = np.where(act, acc + xi * xi, acc)
    acc = block_sum(ctx, acc, scratch, F64)
    st(ctx, parts, ctx.bid, np.sqrt(acc).astype(F32), ctx.tid == 0)


class AdamStep:
    """src/model/optim.rs AdamStep::new (f32)."""

    def __init__(self, step, lr, gscale, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
        self.lr, self.gscale = F32(lr), F32(gscale)
        self.b1, self.b2, self.eps, self.wd = F32(b1), F32(b2), F32(eps), F32(wd)
        p1, p2 = F32(1), F32(1)
        for _ in range(step):  # powi: repeated products (the kernel and the reference share them)
            p1, p2 = F32(p1 * self.b1), F32(p2 * self.b2)
        self.bc1 = F32(F32(1) - p1)
        self.bc2_sqrt = F32(np.sqrt(F32(F32(1) - p2)))

    def apply(self, p, m, v, g):
        """AdamStep::apply in f32, Rust's order (Rust never contracts to FMA)."""
        b1, b2, one = self.b1, self.b2, F32(1)
        decay = F32(one - F32(self.lr * self.wd))
        gi = (g * self.gscale).astype(F32)
        m[:] = (b1 * m).astype(F32) + ((one - b1) * gi).astype(F32)
        v[:] = (b2 * v).astype(F32) + (((one - b2) * gi).astype(F32) * gi).astype(F32)
        num = (self.lr * (m / self.bc1).astype(F32)).astype(F32)
        den = ((np.sqrt(v) / self.bc2_sqrt).astype(F32) + self.eps).astype(F32)
        p[:] = (p * decay).astype(F32) - (num / den).astype(F32)


def w_adamw_step(p, m, v, g, p_off, s_off, n, h):
    assert p_off + n <= p.n and p_off + n <= g.n
    assert s_off + n <= m.n and s_off + n <= v.n
    if n == 0:
        return
    pv, gv = View(p.buf, p.off + p_off, n), View(g.buf, g.off + p_off, n)
    mv, vv = View(m.buf, m.off + s_off, n), View(v.buf, v.off + s_off, n)
    launch("adamw_step", k_adamw_step, *blocks_for(n), 0,
           [pv, mv, vv, gv, n, h.gscale, h.lr, h.b1, h.b2, h.eps, h.wd, h.bc1, h.bc2_sqrt])


def w_partial_norms(parts, at, x, n):
    assert at + SUM_PARTS <= parts.n and n <= x.n
    out = View(parts.buf, parts.off + at, SUM_PARTS)
    launch("partial_norms", k_partial_norms, SUM_PARTS, 256, 0, [out, x, n])

