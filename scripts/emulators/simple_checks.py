"""The simple-kernels emulator's (scripts/emulate_simple_kernels.py) checks: float64 references from
the CPU spec (src/model/cpu/*.rs, engine/host.rs, optim.rs, model.rs rope_inv_freq), one test per
kernel family launching the emulated kernels through their wrappers on poisoned buffers, and run(),
the cases per --only group."""
import numpy as np

from . import simple_machine as machine
from .simple_attention import w_attention_bwd_simple, w_attention_decode, w_attention_fwd_simple
from .simple_kernels import (SUM_PARTS, AdamStep, splitmix64, w_adamw_step, w_add, w_add_bias_rows, w_cast,
                             w_dropout, w_embedding_fwd, w_gather, w_rmsnorm_bwd, w_rmsnorm_fwd, w_rope_rotate,
                             w_scatter, w_partial_norms, w_swiglu_bwd, w_swiglu_fwd)
from .gpu import bf16_bits, round_bf16
from .simple_machine import F32, F64, Buf, check_writes, mask_of, problem, record, rel_err, take_problems

TOL_BF16, TOL_F32 = 1e-2, 1e-5  # src/engine/cuda/selftest/mod.rs


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def bfv(rng, n, std=1.0):
    return round_bf16((rng.standard_normal(n) * std).astype(F32), quiet_nan=True)


def nanbuf(name, n, kind="bf16", **kw):
    return Buf(name, np.full(n, np.nan), kind, **kw)


def test_rmsnorm(rng, t, d):
    case = f"{t}x{d}"
    P0 = len(machine.PROBLEMS)
    x, w, dy = bfv(rng, t * d), bfv(rng, d, 0.5), bfv(rng, t * d)
    if t == 7:
        x[3 * d:4 * d] = 0  # a zero row: rstd = 1 / sqrt(eps)
    X, W, DY = Buf("x", x, "bf16"), Buf("w", w, "bf16"), Buf("dy", dy, "bf16")
    Y, R = nanbuf("y", t * d + 3), nanbuf("rstd", t + 2, "f32")
    w_rmsnorm_fwd(Y.view(), R.view(), X.view(), W.view(), t, 1e-5)
    check_writes("rmsnorm_fwd", Y, mask_of(Y.data.size, 0, t * d))
    check_writes("rmsnorm_fwd", R, mask_of(R.data.size, 0, t))
    x64, w64, dy64 = x.astype(F64).reshape(t, d), w.astype(F64), dy.astype(F64).reshape(t, d)
    r64 = 1.0 / np.sqrt((x64 ** 2).mean(1) + F64(F32(1e-5)))
    want = x64 * r64[:, None] * w64
    DX = nanbuf("dx", t * d + 3)
    w_rmsnorm_bwd(DX.view(), DY.view(), X.view(), W.view(), R.view(), t)
    check_writes("rmsnorm_bwd", DX, mask_of(DX.data.size, 0, t * d))
    dot = (dy64 * w64 * x64).sum(1)
    wdx = r64[:, None] * w64 * dy64 - (r64 ** 3 / d * dot)[:, None] * x64
    pr = take_problems(P0)
    record("rmsnorm_fwd", case, rel_err(Y.data[:t * d], want), TOL_BF16, pr)
    record("rmsnorm_fwd rstd", case, rel_err(R.data[:t], r64), TOL_F32, pr)
    record("rmsnorm_bwd", case, rel_err(DX.data[:t * d], wdx), TOL_BF16, pr)


def rope_inv_freq(hd, theta, llama3=None):
    """src/model/forward.rs rope_inv_freq in f32."""
    i = np.arange(hd // 2)
    base = (F32(1) / np.power(F64(F32(theta)), (F32(2) * i.astype(F32) / F32(hd)).astype(F64)).astype(F32))
    base = base.astype(F32)
    if llama3 is None:
        return base
    factor, lo, hi, ctx = (F32(a) for a in llama3)
    low_w, high_w = F32(ctx / lo), F32(ctx / hi)
    out = []
    for inv in base:
        wl = F32(F32(2 * F32(np.pi)) / inv)
        if wl < high_w:
            out.append(inv)
        elif wl > low_w:
            out.append(F32(inv / factor))
        else:
            sm = F32(F32(F32(ctx / wl) - lo) / F32(hi - lo))
            out.append(F32(F32(F32(F32(1) - sm) * inv / factor) + F32(sm * inv)))
    return np.array(out, F32)


def test_rope(rng, lens, heads, hd, llama3, offset=0):
    t = sum(lens)
    kind = "llama3" if llama3 else "default"
    case = f"{lens}x{heads}x{hd} {kind}" + (f" +{offset}" if offset else "")
    inv = rope_inv_freq(hd, 500000.0 if llama3 else 10000.0, (8.0, 1.0, 4.0, 8192.0) if llama3 else None)
    pos = np.concatenate([np.arange(n) + offset for n in lens]).astype(np.int32)  # restarts per sequence
    x = bfv(rng, t * heads * hd)
    for op, sign in [("rope_fwd", 1.0), ("rope_bwd", -1.0)]:
        P0 = len(machine.PROBLEMS)
        X = Buf("x", np.concatenate([x, [7.0, 7.0]]), "bf16", track=True)
        w_rope_rotate(X.view(), Buf("pos", pos, "i32").view(), Buf("inv", inv, "f32").view(), t, heads, sign)
        check_writes("rope_rotate", X, mask_of(X.data.size, 0, t * heads * hd))
        ang = (pos.astype(F32)[:, None] * inv[None, :]).astype(F32).astype(F64)  # f32 angle, accurate sin/cos
        sn, cs = sign * np.sin(ang).astype(F32).astype(F64), np.cos(ang).astype(F32).astype(F64)
        xr = x.astype(F64).reshape(t, heads, hd)
        a, b = xr[..., :hd // 2], xr[..., hd // 2:]
        want = np.concatenate([a * cs[:, None] - b * sn[:, None], b * cs[:, None] + a * sn[:, None]], -1)
        record(op, case, rel_err(X.data[:t * heads * hd], want), TOL_BF16, take_problems(P0))


def test_swiglu(rng, n, gstd=2.0):
    P0 = len(machine.PROBLEMS)
    g, u, do = bfv(rng, n, gstd), bfv(rng, n), bfv(rng, n)
    G, U, DO = Buf("gate", g, "bf16"), Buf("up", u, "bf16"), Buf("dout", do, "bf16")
    O = nanbuf("out", n + 5)
    w_swiglu_fwd(O.view(), G.view(), U.view(), n)
    check_writes("swiglu_fwd", O, mask_of(n + 5, 0, n))
    g64, u64, d64 = g.astype(F64), u.astype(F64), do.astype(F64)
    s = 1 / (1 + np.exp(-g64))
    DG, DU = nanbuf("dgate", n + 5), nanbuf("dup", n + 5)
    w_swiglu_bwd(DG.view(), DU.view(), DO.view(), G.view(), U.view(), n)
    check_writes("swiglu_bwd", DG, mask_of(n + 5, 0, n))
    check_writes("swiglu_bwd", DU, mask_of(n + 5, 0, n))
    pr = take_problems(P0)
    case = str(n) + ("" if gstd == 2.0 else f" gate std {gstd:g}")
    record("swiglu_fwd", case, rel_err(O.data[:n], g64 * s * u64), TOL_BF16, pr)
    err = max(rel_err(DG.data[:n], d64 * u64 * s * (1 + g64 * (1 - s))), rel_err(DU.data[:n], d64 * g64 * s))
    record("swiglu_bwd", case, err, TOL_BF16, pr)


def test_embedding(rng, t, d, vocab):
    P0 = len(machine.PROBLEMS)
    table = bfv(rng, vocab * d)
    toks = rng.integers(0, vocab, t).astype(np.int32)
    bad = np.zeros(t, bool)
    if t > 3:  # ids outside the table write NaN (embedding.cu's contract)
        toks[1], toks[3] = -1, vocab
        bad[[1, 3]] = True
    O = nanbuf("out", t * d + 4)
    w_embedding_fwd(O.view(), Buf("table", table, "bf16").view(), Buf("tokens", toks, "i32").view(), t, d)
    check_writes("embedding_fwd", O, mask_of(t * d + 4, 0, t * d))
    got = O.data[:t * d].reshape(t, d)
    ok = (got[~bad] == table.reshape(vocab, d)[toks[~bad]]).all() and np.isnan(got[bad]).all()
    record("embedding_fwd (exact)", f"{t}x{d}x{vocab}" + (" +2 bad ids" if bad.any() else ""),
           0.0 if ok else np.inf, 0.0, take_problems(P0))


def rust_dropout_ref(x, seed, p):
    """cpu::dropout: Rng::new(seed), uniform() per element in order (state advanced by the golden
    gamma each draw: a running sum, wrapping), kept when (u as f32) >= p."""
    n = x.size
    gam = np.full(n, 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        state = np.uint64(seed) + np.cumsum(gam, dtype=np.uint64)
        z = splitmix64(state)
    u = (z >> np.uint64(11)).astype(F64) * (1.0 / float(1 << 53))
    p = F32(p)
    keep = F32(F32(1) / (F32(1) - p))
    kept = u.astype(F32) >= p
    return np.where(kept, (x * keep).astype(F32), F32(0)).astype(F32), kept


def test_elementwise(rng, n):
    # add_bf16 (in place)
    P0 = len(machine.PROBLEMS)
    x, y = bfv(rng, n), bfv(rng, n)
    X = Buf("x", np.concatenate([x, [3.0]]), "bf16", track=True)
    w_add(X.view(), Buf("y", y, "bf16").view(), n)
    check_writes("add_bf16", X, mask_of(n + 1, 0, n))
    exact = (X.data[:n] == round_bf16(x + y, quiet_nan=True)).all() and X.data[n] == 3.0
    record("add_bf16", str(n), rel_err(X.data[:n], x.astype(F64) + y), TOL_BF16, take_problems(P0))
    record("add_bf16 (== host, exact)", str(n), 0.0 if exact else np.inf, 0.0)
    # cast_f32_bf16, with ties, overflow to inf, denormals and NaN
    P0 = len(machine.PROBLEMS)
    f = (rng.standard_normal(n) * 3).astype(F32)
    if n >= 16:
        sp = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x7F7F8000, 0x00018000, 0x80000001,
                       0x7FC00001, 0xFF800000, 0x00000000, 0x3F80FFFF, 0x7F7F7FFF], np.uint32).view(F32)
        f[:sp.size] = sp
    O = nanbuf("out", n + 2)
    w_cast(O.view(), Buf("xf", f, "f32").view(), n)
    check_writes("cast_f32_bf16", O, mask_of(n + 2, 0, n))
    gb = bf16_bits(O.data[:n], quiet_nan=True)
    wb = bf16_bits(round_bf16(f, quiet_nan=True), quiet_nan=True)  # half::bf16::from_f32
    same = (gb == wb) | (np.isnan(O.data[:n]) & np.isnan(f))
    record("cast_f32_bf16 (bits differing)", str(n), float((~same).sum()), 0.0, take_problems(P0))
    # dropout_bf16, separate output and in place (out may alias x)
    for alias in (False, True):
        P0 = len(machine.PROBLEMS)
        seed = int(rng.integers(0, 2 ** 63)) * 2 + 1
        want, kept = rust_dropout_ref(x, seed, 0.1)
        if alias:
            XX = Buf("x", np.concatenate([x, [5.0]]), "bf16", track=True)
            w_dropout(XX.view(), XX.view(), seed, 0.1, n)
            O = XX
        else:
            O = nanbuf("out", n + 1)
            w_dropout(O.view(), Buf("x", x, "bf16").view(), seed, 0.1, n)
        check_writes("dropout_bf16", O, mask_of(n + 1, 0, n))
        got = O.data[:n]
        masks = float(((got == 0) != (want == 0)).sum())
        tag = f"{n}" + (" in place" if alias else "")
        pr = take_problems(P0)
        record("dropout mask (differing)", tag, masks, 0.0, pr)
        exact = (got == round_bf16(want, quiet_nan=True)).all()
        record("dropout (== cpu, exact)", tag, 0.0 if exact else np.inf, 0.0, pr)


def test_rows(rng, T, n, d):
    P0 = len(machine.PROBLEMS)
    x = bfv(rng, T * d)
    idx = rng.permutation(T)[:n].astype(np.int32)
    O = nanbuf("out", n * d + 3)
    w_gather(O.view(), Buf("x", x, "bf16").view(), Buf("idx", idx, "i32").view(), n, d)
    check_writes("gather_rows", O, mask_of(n * d + 3, 0, n * d))
    ok = (O.data[:n * d].reshape(n, d) == x.reshape(T, d)[idx]).all()
    record("gather_rows (exact)", f"{n} of {T}x{d}", 0.0 if ok else np.inf, 0.0, take_problems(P0))
    P0 = len(machine.PROBLEMS)
    base = bfv(rng, T * d)
    src = bfv(rng, n * d)
    OUT = Buf("out", base, "bf16")
    w_scatter(OUT.view(), Buf("x", src, "bf16").view(), Buf("idx", idx, "i32").view(), n, d)
    expect = np.zeros((T, d), bool)
    expect[idx] = True
    check_writes("scatter_rows", OUT, expect.ravel())
    want = base.reshape(T, d).copy()
    want[idx] = src.reshape(n, d)
    ok = (OUT.data.reshape(T, d) == want).all()
    record("scatter_rows (exact)", f"{n} into {T}x{d}", 0.0 if ok else np.inf, 0.0, take_problems(P0))


def test_bias(rng, t, N):
    P0 = len(machine.PROBLEMS)
    y, b = bfv(rng, t * N), bfv(rng, N, 0.1)
    Y = Buf("y", np.concatenate([y, [1.0]]), "bf16", track=True)
    w_add_bias_rows(Y.view(), Buf("bias", b, "bf16").view(), t, N)
    check_writes("add_bias_rows", Y, mask_of(t * N + 1, 0, t * N))
    want = y.reshape(t, N).astype(F64) + b.astype(F64)
    exact = (Y.data[:t * N].reshape(t, N) == round_bf16(y.reshape(t, N) + b, quiet_nan=True)).all()
    pr = take_problems(P0)
    record("add_bias_rows", f"{t}x{N}", rel_err(Y.data[:t * N], want), TOL_BF16, pr)
    record("add_bias_rows (== f32 add, exact)", f"{t}x{N}", 0.0 if exact else np.inf, 0.0)


def test_adamw(rng, n):
    P0 = len(machine.PROBLEMS)
    p_off, s_off, tail = 7, 3, 5
    p0 = (rng.standard_normal(p_off + n + tail) * 0.1).astype(F32)
    grads = [(rng.standard_normal(p_off + n + tail) * 0.01).astype(F32) for _ in range(3)]
    m0 = np.concatenate([np.full(s_off, 0.5), np.zeros(n), np.full(tail, 0.25)]).astype(F32)
    P, M, V = Buf("p", p0, "f32", track=True), Buf("m", m0, "f32", track=True), Buf("v", m0, "f32", track=True)
    wp, wm, wv = p0.copy(), m0.copy(), m0.copy()
    for s, g in enumerate(grads):
        h = AdamStep(s + 1, 1e-3, 0.37 if s == 1 else 1.0, wd=0.01)
        G = Buf("g", g, "f32")
        w_adamw_step(P.view(), M.view(), V.view(), G.view(), p_off, s_off, n, h)
        check_writes("adamw_step", P, mask_of(P.data.size, p_off, p_off + n))
        check_writes("adamw_step", M, mask_of(M.data.size, s_off, s_off + n))
        check_writes("adamw_step", V, mask_of(V.data.size, s_off, s_off + n))
        check_writes("adamw_step", G, np.zeros(G.data.size, bool))
        ps, ss = slice(p_off, p_off + n), slice(s_off, s_off + n)
        pw, mw, vw = wp[ps].copy(), wm[ss].copy(), wv[ss].copy()
        h.apply(pw, mw, vw, g[ps])
        wp[ps], wm[ss], wv[ss] = pw, mw, vw
    nbits = int((P.data.view(np.uint32) != wp.view(np.uint32)).sum() + (M.data.view(np.uint32) != wm.view(np.uint32)).sum()
                + (V.data.view(np.uint32) != wv.view(np.uint32)).sum())
    pr = take_problems(P0)
    d = (P.data.astype(F64) - p0, wp.astype(F64) - p0)
    record("adamw_step (rel err of update)", f"{n} x3", max(rel_err(*d), rel_err(V.data, wv)), 1e-6, pr)
    record("adamw_step (bits differing p,m,v)", f"{n} x3", float(nbits), 0.0, pr)


def test_partial_norms(rng, n, scale=0.3):
    P0 = len(machine.PROBLEMS)
    x = (rng.standard_normal(n) * scale).astype(F32)
    at = 5
    PARTS = nanbuf("parts", at + SUM_PARTS + 2, "f32")
    X = Buf("x", np.concatenate([x, np.full(37, np.nan)]), "f32", count_reads=True)
    w_partial_norms(PARTS.view(), at, X.view(), n)
    check_writes("partial_norms", PARTS, mask_of(PARTS.data.size, at, at + SUM_PARTS))
    problem("partial_norms", "x[i < n] not read exactly once", (X.reads[:n] != 1).sum())
    problem("partial_norms", "x read past n", (X.reads[n:] != 0).sum())
    got = np.sqrt((PARTS.data[at:at + SUM_PARTS].astype(F64) ** 2).sum())
    want = np.sqrt((x.astype(F64) ** 2).sum())
    err = abs(got - want) / want if want > 0 else (0.0 if got == 0 else np.inf)
    if not np.isfinite(got):
        err = np.inf
    label = "" if scale < 1 else f" (|x| ~ {scale:.0e})"
    record("partial_norms" + label, str(n), err, TOL_F32, take_problems(P0))


def attn_ref(q, k, v, dout, starts_lens, heads, kv_heads, hd):
    """float64 twin of cpu::attention_fwd / attention_bwd per packed sequence, with the lse."""
    T = q.shape[0]
    group = heads // kv_heads
    scale = 1.0 / np.sqrt(hd)
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    lse = np.zeros((T, heads))
    kvh = np.arange(heads) // group
    for s0, L in starts_lens:
        Q, dO = q[s0:s0 + L], dout[s0:s0 + L]  # [L, H, hd]
        K, V = k[s0:s0 + L][:, kvh], v[s0:s0 + L][:, kvh]  # [L, H, hd]
        S = np.einsum("thd,shd->hts", Q, K) * scale
        S = np.where(np.tril(np.ones((L, L), bool))[None], S, -np.inf)
        m = S.max(2, keepdims=True)
        E = np.exp(S - m)
        Z = E.sum(2, keepdims=True)
        P = E / Z
        lse[s0:s0 + L] = (m + np.log(Z))[..., 0].T
        O = np.einsum("hts,shd->thd", P, V)
        out[s0:s0 + L] = O
        dP = np.einsum("thd,shd->hts", dO, V)
        D = np.einsum("thd,thd->ht", dO, O)
        dS = P * (dP - D[..., None]) * scale
        dq[s0:s0 + L] = np.einsum("hts,shd->thd", dS, K)
        dKh = np.einsum("hts,thd->shd", dS, Q)
        dVh = np.einsum("hts,thd->shd", P, dO)
        for g in range(kv_heads):
            dk[s0:s0 + L, g] = dKh[:, g * group:(g + 1) * group].sum(1)
            dv[s0:s0 + L, g] = dVh[:, g * group:(g + 1) * group].sum(1)
    return out, lse, dq, dk, dv


def test_attention(rng, lens, heads, kv_heads, hd):
    case = f"{lens}x{heads}/{kv_heads}x{hd}"
    P0 = len(machine.PROBLEMS)
    t = sum(lens)
    q, k, v = bfv(rng, t * heads * hd), bfv(rng, t * kv_heads * hd), bfv(rng, t * kv_heads * hd)
    dout = bfv(rng, t * heads * hd)
    starts = np.concatenate([np.full(n, sum(lens[:i])) for i, n in enumerate(lens)]).astype(np.int32)
    max_len = max(lens)
    dims = (heads, kv_heads, hd)
    Q, K, V, DO = Buf("q", q, "bf16"), Buf("k", k, "bf16"), Buf("v", v, "bf16"), Buf("dout", dout, "bf16")
    SS = Buf("seq_start", starts, "i32")
    nq, nkv = t * heads * hd, t * kv_heads * hd
    O, LSE = nanbuf("out", nq + 8), nanbuf("lse", t * heads + 2, "f32")
    w_attention_fwd_simple(O.view(), LSE.view(), Q.view(), K.view(), V.view(), SS.view(), t, dims, max_len)
    check_writes("attention_fwd", O, mask_of(O.data.size, 0, nq))
    check_writes("attention_fwd", LSE, mask_of(LSE.data.size, 0, t * heads))
    DQ, DK, DV = nanbuf("dq", nq + 8), nanbuf("dk", nkv + 8), nanbuf("dv", nkv + 8)
    DD = nanbuf("dd", t * heads + 2, "f32")
    w_attention_bwd_simple(DQ.view(), DK.view(), DV.view(), DD.view(), DO.view(), Q.view(), K.view(), V.view(),
                           O.view(), LSE.view(), SS.view(), t, dims, max_len)
    for nm, B, nn in [("dq", DQ, nq), ("dk", DK, nkv), ("dv", DV, nkv)]:
        check_writes(f"attention_bwd_{'dq' if nm == 'dq' else 'dkv'}", B, mask_of(B.data.size, 0, nn))
    check_writes("attention_bwd_rowdot", DD, mask_of(DD.data.size, 0, t * heads))
    sl = [(sum(lens[:i]), n) for i, n in enumerate(lens)]
    r = attn_ref(q.astype(F64).reshape(t, heads, hd), k.astype(F64).reshape(t, kv_heads, hd),
                 v.astype(F64).reshape(t, kv_heads, hd), dout.astype(F64).reshape(t, heads, hd), sl, heads, kv_heads, hd)
    wo, wlse, wdq, wdk, wdv = r
    # D as the kernel's inputs define it: dO . O with O the forward's bf16 output
    wdd = (dout.astype(F64).reshape(-1, hd) * np.nan_to_num(O.data[:nq]).astype(F64).reshape(-1, hd)).sum(1)
    pr = take_problems(P0)
    record("attention_fwd lse", case, rel_err(LSE.data[:t * heads], wlse), 1e-5, pr)
    record("attention_fwd", case, rel_err(O.data[:nq], wo), TOL_BF16, pr)
    record("attention_bwd_rowdot dd", case, rel_err(DD.data[:t * heads], wdd), TOL_F32, pr)
    record("attention_bwd dq", case, rel_err(DQ.data[:nq], wdq), TOL_BF16, pr)
    record("attention_bwd dk", case, rel_err(DK.data[:nkv], wdk), TOL_BF16, pr)
    record("attention_bwd dv", case, rel_err(DV.data[:nkv], wdv), TOL_BF16, pr)


def test_decode(rng, key_lens, heads, kv_heads, hd):
    P0 = len(machine.PROBLEMS)
    b = len(key_lens)
    rows = sum(key_lens) + 5 + 3
    q = bfv(rng, b * heads * hd)
    k, v = bfv(rng, rows * kv_heads * hd), bfv(rng, rows * kv_heads * hd)
    starts = np.zeros(b, np.int32)
    nxt = 5
    for i in reversed(range(b)):  # stored back to front with a gap of 5 rows in front, 3 behind
        starts[i] = nxt
        nxt += key_lens[i]
    max_len = max(key_lens)
    O = nanbuf("out", b * heads * hd + 4)
    K, V = Buf("kcache", k, "bf16"), Buf("vcache", v, "bf16")
    w_attention_decode(O.view(), Buf("q", q, "bf16").view(), K.view(), V.view(), Buf("key_start", starts, "i32").view(),
                       Buf("key_len", np.array(key_lens, np.int32), "i32").view(), b, (heads, kv_heads, hd), max_len)
    check_writes("attention_decode", O, mask_of(O.data.size, 0, b * heads * hd))
    check_writes("attention_decode", K, np.zeros(K.data.size, bool))
    check_writes("attention_decode", V, np.zeros(V.data.size, bool))
    want = np.zeros((b, heads, hd))
    kk, vv = k.astype(F64).reshape(rows, kv_heads, hd), v.astype(F64).reshape(rows, kv_heads, hd)
    qq = q.astype(F64).reshape(b, heads, hd)
    for i in range(b):
        s, n = starts[i], key_lens[i]
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            sc = kk[s:s + n, kvh] @ qq[i, h] / np.sqrt(hd)
            pp = np.exp(sc - sc.max())
            want[i, h] = (pp / pp.sum()) @ vv[s:s + n, kvh]
    record("attention_decode", f"{key_lens}x{heads}/{kv_heads}x{hd}", rel_err(O.data[:b * heads * hd], want), TOL_BF16,
           take_problems(P0))


def run(only, rng):
    if "norm" in only:
        for t in (1, 7, 33):
            for d in (64, 576, 1000, 4104):
                test_rmsnorm(rng, t, d)
    if "rope" in only:
        for lens, heads, hd, l3, off in [([5], 3, 64, False, 0), ([3, 14], 9, 64, True, 0), ([3], 2, 128, True, 8000),
                                         ([7, 1, 9], 4, 80, False, 0), ([2, 5], 2, 256, True, 100), ([33], 1, 8, False, 0),
                                         ([6, 6], 3, 16, True, 0)]:
            test_rope(rng, lens, heads, hd, l3, off)
    if "swiglu" in only:
        for n in (1, 1000, 65537):
            test_swiglu(rng, n)
        test_swiglu(rng, 4099, 40.0)  # exp over / underflow in both tails
    if "embed" in only:
        for t, d, vocab in [(1, 64, 10), (37, 576, 300), (7, 1000, 33)]:
            test_embedding(rng, t, d, vocab)
    if "elem" in only:
        for n in (1, 1000, 65537):
            test_elementwise(rng, n)
        for T, n, d in [(1, 1, 64), (33, 20, 576), (7, 7, 1000)]:
            test_rows(rng, T, n, d)
        for t, N in [(1, 64), (7, 1000), (33, 4104)]:
            test_bias(rng, t, N)
    if "optim" in only:
        for n in (1, 1000, 100003):
            test_adamw(rng, n)
        for n in (0, 1, 1000, 100003, 3 * 65536 + 17):
            test_partial_norms(rng, n)
        for n in (1000, 100003):  # every f32 square overflows; the norm fits f32
            test_partial_norms(rng, n, 3e19)
    if "attn" in only:
        for lens, heads, kv_heads, hd in [([3, 5], 4, 2, 16), ([17], 3, 3, 8), ([40, 9], 8, 1, 64),
                                          ([300, 1, 129], 8, 2, 80), ([130], 2, 1, 256), ([65, 63, 1], 4, 2, 64),
                                          ([200, 1, 90], 6, 3, 32), ([130, 7], 4, 1, 128)]:
            test_attention(rng, lens, heads, kv_heads, hd)
        for key_lens, heads, kv_heads, hd in [([1, 7, 200], 4, 2, 64), ([33], 6, 3, 96), ([150, 3], 8, 2, 256),
                                              ([129, 2], 3, 1, 8)]:
            test_decode(rng, key_lens, heads, kv_heads, hd)

