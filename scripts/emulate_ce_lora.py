#!/usr/bin/env python3
"""Lane-level numpy emulator of kernels/cross_entropy.cu and kernels/lora.cu (sqlora).

Every kernel is mirrored line by line: one numpy axis for the blocks of the grid, one for the threads
of a block (lanes and warps are tid % 32, tid / 32), optional trailing axes where one thread runs a
loop with no shared-memory or global write inside (the loop's reads are batched, its arithmetic
still runs in order). Launches copy the Rust wrappers (grid, block, shared memory 0, argument values):
src/engine/cuda/ops.rs and head.rs for the loss kernels, src/engine/cuda/lora.rs for LoRA, whose
lora_fwd_via / lora_bwd_via take either LoraPath (w_lora_fwd / w_lora_bwd `path`: tiled, the default,
or simple). Results are compared with float64 references written from the CPU spec
(src/model/cpu/{cross_entropy,lora}.rs, src/engine/host.rs, generate::argmax).

LoRA runs both paths on the same inputs (the backward of each takes the simple forward's xa), each
against the references, then the tiled kernels against the simple ones on identical inputs:
lora_add_tiled / lora_dx_tiled bit for bit (`= simple`: elements whose bits differ), the tiled long
sums (xa, g, dB, dA) to f32 rounding (`~ simple`: the largest |tiled - simple| over 2 n u sum|terms|,
the bound any two f32 orders of the n terms keep to; <= 1 passes).

Checked besides the values: global out-of-bounds (against the buffer, or the wrapper's slice),
unaligned vector loads, stores of values that are not bf16 into bf16 buffers, unwritten and
multiply-written outputs, writes outside the expected range (LoRA neighbours at `at` offsets, rows
of dh outside the chunk), reads of shared memory not written in the block, and conflicting accesses
(write/write or read/write by different threads) to one shared location between two barriers.

Arithmetic: float32 everywhere; nvcc contracts a*b+c into FMA by default (no -fmad=false in
build.rs), emulated as round_f32(a*b + c) in float64 (exact product); __expf = ex2.approx.ftz of
x*log2(e); bf16 conversions round to nearest even; mma.sync m16n8k16 from the PTX fragment layout.

usage: emulate_ce_lora.py [--inject NAME ...] [--list-injections] [--validate] [--only ce|lora|argmax]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the emulators package
sys.dont_write_bytecode = True  # no __pycache__ left in scripts/emulators
from emulators import ce_lora_kernels as kernels  # noqa: E402
from emulators.ce_lora_kernels import (SIMPLE, TILED, LoraAt, blocks_for, per_16, w_argmax_rows,  # noqa: E402
                                       w_ce_softmax_grad, w_head_grad, w_head_logits, w_lora_bwd, w_lora_fwd)
from emulators.ce_lora_machine import F32, Buf  # noqa: E402
from emulators.gpu import check_mma_layout, round_bf16  # noqa: E402
from emulators import sources  # noqa: E402

# The kernel sources this emulator transcribes (emulators/sources.py).
SOURCES = {'kernels/cross_entropy.cu': 'aa5d3399cd8f4200', 'kernels/lora.cu': '3c096324e8ca8ea2', 'kernels/mma.cuh': '26d0cdc5b3e1f3f4', 'kernels/common.cuh': '6b281844157a8164'}

INJECTIONS = {
    "mma_b1": "mma_gemm: b1 fragment read from Bs[col][k+2q] instead of k+2q+8",
    "ce_target": "ce_softmax_grad: targets[i] instead of targets[row0 + i]",
    "rp_nosync": "row_proj: second __syncthreads() dropped (shared race)",
    "ts_tail": "token_sum: the col < U guard dropped on the output",
    "argmax_tie": "argmax_rows: warp tie rule oi > bi (last index wins)",
    "lora_add_r": "lora_add: sum over c < r - 1",
    "stage_a_pad": "stage_a element path: skip the last column of the tile (unwritten shared read)",
    "ss_nosync": "sum_slices: the __syncthreads() between storing the tiles and adding them dropped",
    "ss_idle": "sum_slices: the idle threads (s >= slices) store their tiles too",
    "lt_step": "row_proj_tiled, token_sum_tiled: the slice loop steps by slices - 1",
    "lt_pad": "row_proj_tiled, token_sum_tiled: the c < r guard dropped when staging ranks (pad not zeroed)",
    "re_tail": "rank_expand_tiled: the t < T guard (break) dropped",
}


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
    return round_bf16(rng.normal(0.0, std, shape).astype(F32))


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
def bits_differ(got, want):
    """Elements whose f32 bit patterns differ (NaN included)."""
    return float((np.asarray(got, F32).view(np.uint32) != np.asarray(want, F32).view(np.uint32)).sum())


def rounding_ratio(got, want, absum, n):
    """Largest |got - want| over the bound 2 n u sum|terms| (u = 2^-24) that two f32 summations of the
    same n terms in any two orders (FMA or not) both keep to: <= 1 agrees to f32 rounding."""
    d = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    if not np.isfinite(d).all():
        return np.inf
    return float((d / np.maximum(2.0 * n * 2.0 ** -24 * absum, 1e-300)).max(initial=0.0))


def test_lora(rng, t, n, k, r, scale=2.0):
    """Both paths (lora.rs LoraPath) on the same inputs against the CPU spec; then the tiled kernels
    against the simple ones on the tiled path's own inputs."""
    case = f"T{t} out{n} in{k} r{r}"
    x, a, b = bf_rand(rng, (t, k), 1.0), bf_rand(rng, (r, k), 0.3), bf_rand(rng, (n, r), 0.3)
    y0 = bf_rand(rng, (t, n), 1.0)
    at = LoraAt(5, 5 + r * k, k, n)  # after 5 values of another adapter, 3 more after (selftest layout)
    wlen = at.b + n * r + 3
    w = bf_rand(rng, wlen, 0.3)
    w[at.a:at.b], w[at.b:at.b + n * r] = a.ravel(), b.ravel()
    dy, dx0 = bf_rand(rng, (t, n), 1.0), bf_rand(rng, (t, k), 1.0)
    grad0 = np.full(wlen, np.nan, F32)
    prior = rng.normal(0.0, 0.5, at.b + n * r - at.a).astype(F32)  # the gradients accumulate
    grad0[at.a:at.b + n * r] = prior
    xd, ad, bd, dyd = x.astype(np.float64), a.astype(np.float64), b.astype(np.float64), dy.astype(np.float64)
    xa_ref, g_ref = xd @ ad.T, dyd @ bd
    in_db = np.zeros(wlen, bool)
    in_db[at.b:at.b + n * r] = True
    in_da = np.zeros(wlen, bool)
    in_da[at.a:at.b] = True
    outside = ~(in_da | in_db)
    xa_used = None  # the simple forward's xa, given to both backward passes (the engine gives each its own)
    out = {}
    for path in (SIMPLE, TILED):
        W, X = Buf("w", w, "bf16"), Buf("x", x, "bf16")
        Y, XA = Buf("y", y0, "bf16"), Buf("xa", np.full(t * r, np.nan), "f32")
        l1, l2 = w_lora_fwd(Y, XA, X, W, at, t, r, scale, path)
        record(l1.name, case, rel(XA.data, xa_ref.ravel()), 1e-5, [l1], writes(l1, XA, np.ones(t * r, bool), "xa"))
        y_ref = y0.astype(np.float64) + scale * xa_ref @ bd.T
        record(l2.name, case, rel(Y.data, y_ref.ravel()), 1e-2, [l2], writes(l2, Y, np.ones(t * n, bool), "y"))
        if xa_used is None:
            xa_used = XA.data.copy()
        XAu = Buf("xa", xa_used, "f32")
        G, DX = Buf("grad", grad0, "f32"), Buf("dx", dx0, "bf16")
        Gs, DY = Buf("g", np.full(t * r, np.nan), "f32"), Buf("dy", dy, "bf16")
        l3, l4, l5, l6 = w_lora_bwd(DX, G, Gs, DY, X, XAu, W, at, t, r, scale, path)
        record(l3.name, case, rel(Gs.data, g_ref.ravel()), 1e-5, [l3], writes(l3, Gs, np.ones(t * r, bool), "g"))
        gd = G.data.astype(np.float64)
        xu = xa_used.astype(np.float64).reshape(t, r)
        db_ref = scale * dyd.T @ xu
        da_ref = scale * g_ref.T @ xd
        changed = int((~np.isnan(G.data[outside])).sum())
        nb = [f"grad neighbours changed: {changed}"] if changed else []
        err_db = rel(gd[in_db] - prior[at.b - at.a:], db_ref.ravel())
        record(l4.name, case, err_db, 1e-4, [l4], writes(l4, G, in_db, "dB") + nb)
        err_da = rel(gd[in_da] - prior[:at.b - at.a], da_ref.ravel())
        record(l5.name, case, err_da, 1e-4, [l5], writes(l5, G, in_da, "dA") + nb)
        dx_ref = dx0.astype(np.float64) + scale * g_ref @ ad
        record(l6.name, case, rel(DX.data, dx_ref.ravel()), 1e-2, [l6], writes(l6, DX, np.ones(t * k, bool), "dx"))
        out[path] = dict(W=W, X=X, XA=XA, Y=Y, G=G, Gs=Gs, DX=DX)

    # The tiled long sums against the simple ones (same inputs: x and a, dy and b, dy and xa_used; dA
    # from the tiled g by the simple lora_da), to f32 rounding. Bits of lora_add_tiled and lora_dx_tiled
    # against lora_add and lora_dx launched on the tiled path's xa and g.
    S, Tl = out[SIMPLE], out[TILED]
    xg = Tl["Gs"].data.astype(np.float64).reshape(t, r)
    W = Tl["W"]
    a_p, b_p = W.ptr(at.a, at.b), W.ptr(at.b, at.b + n * r)
    Y2, DX2 = Buf("y", y0, "bf16"), Buf("dx", dx0, "bf16")
    G2 = Buf("grad", grad0, "f32")
    la = kernels.run(kernels.lora_add, blocks_for(t * n), [Y2], Y2.ptr(), Tl["XA"].ptr(), b_p, t, n, r, scale)
    record("lora_add_tiled = simple", case, bits_differ(Tl["Y"].data, Y2.data), 0.0, [la])
    ld = kernels.run(kernels.lora_dx, blocks_for(t * k), [DX2], DX2.ptr(), Tl["Gs"].ptr(), a_p, t, k, r, scale)
    record("lora_dx_tiled = simple", case, bits_differ(Tl["DX"].data, DX2.data), 0.0, [ld])
    lda = kernels.run(kernels.lora_da, per_16(k), [G2], G2.ptr(at.a, at.b), Tl["Gs"].ptr(), Tl["X"].ptr(),
                      t, k, r, scale)
    pa, pb = np.abs(prior[:at.b - at.a]).astype(np.float64), np.abs(prior[at.b - at.a:]).astype(np.float64)
    ax, ag = np.abs(xd), np.abs(xg)
    record("lora_xa_tiled ~ simple", case,
           rounding_ratio(Tl["XA"].data, S["XA"].data, (ax @ np.abs(ad).T).ravel(), k), 1.0)
    record("lora_g_tiled ~ simple", case,
           rounding_ratio(Tl["Gs"].data, S["Gs"].data, (np.abs(dyd) @ np.abs(bd)).ravel(), n), 1.0)
    record("lora_db_tiled ~ simple", case, rounding_ratio(Tl["G"].data[in_db], S["G"].data[in_db],
           pb + scale * (np.abs(dyd).T @ np.abs(xu)).ravel(), t + 1), 1.0)
    record("lora_da_tiled ~ simple", case, rounding_ratio(Tl["G"].data[in_da], G2.data[in_da],
           pa + scale * (ag.T @ ax).ravel(), t + 1), 1.0, [lda])


def test_ce(rng, t, n_lab, d, V, chunk):
    """loss_and_dh (src/engine/step/mod.rs) on n_lab labelled rows of t tokens, in chunks of `chunk`."""
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
                 "rp_nosync": "lora", "ts_tail": "lora", "lora_add_r": "lora", "ss_nosync": "lora",
                 "ss_idle": "lora", "lt_step": "lora", "lt_pad": "lora", "re_tail": "lora"}


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
    kernels.INJECT.update(args.inject)
    only = set(args.only or ["ce", "lora", "argmax"])
    t_start = time.time()
    rng = np.random.default_rng(1234)
    # mma_bf16 against A @ B + C (fragments packed lane by lane from the PTX ISA listing)
    A, Bm = round_bf16(rng.normal(size=(16, 16)).astype(F32)), round_bf16(rng.normal(size=(16, 8)).astype(F32))
    check_mma_layout(A[None], Bm[None], rng.normal(size=(1, 16, 8)).astype(F32))
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
        # the rest of selftest.rs lora_cases (ranks not a multiple of 4: zero-padded rank groups; r 12:
        # 4 idle threads), and r 33 (rg 9: 7 slices, 4 idle threads, 3 padded ranks) past 64 tokens
        cases += [(33, 96, 200, 16), (37, 130, 150, 12), (130, 70, 20, 5), (65, 70, 130, 33)]
        for t, n, k, r in cases:
            test_lora(rng, t, n, k, r)
        for path in (SIMPLE, TILED):
            try:
                w_lora_fwd(Buf("y", np.zeros(65), "bf16"), Buf("xa", np.zeros(65), "f32"),
                           Buf("x", np.zeros(1), "bf16"), Buf("w", np.zeros(65 + 65), "bf16"), LoraAt(0, 65, 1, 1),
                           1, 65, 1.0, path)
                record("lora r=65 refused", path, np.inf, 0.0, problems=["r > 64 was launched"])
            except ValueError:
                record("lora r=65 refused", path, 0.0, 0.0)
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
    print(f"\n{len(RESULTS)} checks, {fails} failed, {len(kernels.LAUNCHES)} launches emulated, {elapsed:.1f} s"
          + (f"  [injected: {', '.join(sorted(kernels.INJECT))}]" if kernels.INJECT else ""))
    smem = {}
    for name, grid, block, sm, _ in kernels.LAUNCHES:
        smem[name] = (block, sm)
    print("mma staging paths taken (block-slices): " + ", ".join(f"{k} {v}" for k, v in sorted(kernels.COVER.items())))
    print("block / static shared bytes: " + ", ".join(f"{k} {b}/{s}" for k, (b, s) in smem.items()))
    return 1 if fails else 0


if __name__ == "__main__":
    sources.check(SOURCES)
    sys.exit(main())
