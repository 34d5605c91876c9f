#!/usr/bin/env python3
"""Lane-level numpy emulator of sqlora's simple kernels (everything but NF4, LoRA, cross entropy and
the tiled attention):

  kernels/attention.cu    attention_fwd, attention_decode, attention_bwd_rowdot, attention_bwd_dq,
                          attention_bwd_dkv (with attention_probs / attention_mix / warp_dot)
  kernels/rmsnorm.cu      rmsnorm_fwd, rmsnorm_bwd
  kernels/rope.cu         rope_rotate
  kernels/swiglu.cu       swiglu_fwd, swiglu_bwd
  kernels/embedding.cu    embedding_fwd
  kernels/elementwise.cu  add_bf16, cast_f32_bf16, dropout_bf16, gather_rows, scatter_rows, add_bias_rows
  kernels/adamw.cu        adamw_step, partial_norms
  kernels/common.cuh      warp_sum, warp_max, block_sum, block_max

Each kernel is mirrored line by line: blocks of the grid and threads of a block are numpy axes
[blocks, threads] (lane = tid % 32, warp = tid / 32); per-thread loops run in lock step with a mask of
the threads still in them; warp shuffles are lane permutations (a shuffle by a partly exited warp is
flagged); block_sum / block_max run as written, __syncthreads included. Launches copy the Rust wrappers
(src/engine/cuda/ops.rs, attention.rs, gemm.rs for add_bias_rows; helpers blocks_for /
block_per_row of mod.rs): grid, block, dynamic shared memory and argument values, including the
slices the wrappers pass (adamw p_off / s_off, partial_norms `at`).

Checked besides the values:
  * global memory: reads / writes outside the buffer or the wrapper's slice; stores into a bf16 buffer
    of values that are not bf16; outputs poisoned (NaN) before each launch; unwritten and
    multiply-written elements; any write outside the expected elements (neighbours of the adamw /
    partial_norms windows, rows scatter_rows must leave alone, the KV cache rows around the decode
    window, which are only read); in-place buffers (rope, add, add_bias_rows, adamw, aliased dropout):
    a read and a write of one element by different threads of a launch;
  * shared memory (static and dynamic, NaN-filled before each block): reads of elements not yet
    written in the block, out-of-range accesses (dynamic: past the bytes the wrapper asked for), and
    conflicting accesses (write/write, read/write by different threads) between two barriers; a
    __syncthreads reached by part of a block;
  * partial_norms reads every x[i], i < n, exactly once (the partial norms cover the input).

Arithmetic: float32 everywhere (numpy float32 ops are IEEE round-to-nearest); bf16 conversion round to
nearest even (__float2bfloat16_rn). nvcc contracts a*b+c into an FMA by default (build.rs passes no
-fmad=false): modelled as one rounding of the exact a*b + c (float64 sum rounded to odd, then to f32,
which is exact double-rounding-free); products of two bf16 values are exact in f32, so the FMA
question does not arise for the dot products. Where a - b*c / a*b - c*d could contract either way the
LLVM DAG combiner's first choice is taken (noted at the line). __fmul_rn / __fadd_rn / __fsub_rn are
not contracted (adamw: bit-exact vs AdamStep::apply, which depends on exactly that). fmaf is an FMA.
Approximations (not bit-faithful, well inside the tolerances): __expf = ex2.approx.ftz(x * log2e)
taken as a correctly rounded exp2 with denormal results flushed; rsqrtf, logf, sincosf as correctly
rounded float64 results rounded to f32.

References: float64 from the CPU spec (src/model/cpu/*.rs, engine/host.rs, optim.rs), compared with
the selftest's measure ||got - want|| / ||want|| and tolerances (1e-2 bf16 outputs, 1e-5 lse /
partial_norms, exact for cast, dropout, embedding, gather / scatter; adamw bit-exact against the f32
AdamStep::apply). The script reads no repository file (constants such as SUM_PARTS = 256 are copied).

usage: emulate_simple_kernels.py [--only GROUP ...] [--inject NAME ...] [--list-injections] [--validate] [-v]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the emulators package
sys.dont_write_bytecode = True  # no __pycache__ left in scripts/emulators
from emulators import simple_machine as machine  # noqa: E402
from emulators.simple_checks import run  # noqa: E402
from emulators import sources  # noqa: E402

# The kernel sources this emulator transcribes (emulators/sources.py).
SOURCES = {'kernels/attention.cu': 'e4f3a11322a2cfa2', 'kernels/rmsnorm.cu': 'c4b9141f6ff2da64', 'kernels/rope.cu': 'dcd8c66dd3b22033', 'kernels/swiglu.cu': '3bacaa2e441edea2', 'kernels/embedding.cu': '5b2ace35255b2f1d', 'kernels/elementwise.cu': 'dfc4af5a59bda227', 'kernels/adamw.cu': '73d010b04f74e333', 'kernels/common.cuh': '6b281844157a8164'}

INJECTIONS = {
    "probs_nosync": ("attn", "attention_probs: the __syncthreads() after the score loop dropped (attention.cu:77)"),
    "bsum_nosync": ("attn", "block_sum: its first __syncthreads() dropped (common.cuh:28)"),
    "causal_off1": ("attn", "attention_fwd: n = t - start (the query's own key left out)"),
    "kvh_mod": ("attn", "attention_fwd/dq/decode: kvh = h % kv_heads instead of h / group"),
    "dkv_self": ("attn", "attention_bwd_dkv: pairs start at t = s + 1 (diagonal left out)"),
    "mix_nosync": ("attn", "attention_mix: the __syncthreads() before the cross-warp sum dropped"),
    "smem_short": ("attn", "wrappers: dynamic shared memory (max_len - 1) * 4 bytes"),
    "rowdot_grid": ("attn", "attention_rowdot wrapper: blocks_for(rows * 16)"),
    "adamw_fma": ("optim", "adamw_step: m update as b1*m + (1-b1)*g with an FMA (no _rn)"),
    "sumsq_stride": ("optim", "partial_norms: stride blockDim instead of gridDim * blockDim"),
    "norm_f32": ("optim", "partial_norms: squares summed in f32 (overflow at |x| ~ 3e19)"),
    "dropout_ctr": ("elem", "dropout_bf16: counter i instead of i + 1"),
    "rope_pos": ("rope", "rope_rotate: t = th % heads instead of th / heads"),
    "rms_eps": ("norm", "rmsnorm_fwd: eps added after the rsqrt"),
}
GROUPS = ["norm", "rope", "swiglu", "elem", "embed", "optim", "attn"]


def validate():
    import subprocess
    bad = 0
    for name, (grp, what) in INJECTIONS.items():
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--inject", name, "--only", grp], capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if " checks, " in x]
        fails = [x.split()[1] for x in r.stdout.splitlines() if x.startswith("FAIL")]
        caught = r.returncode == 1 and line
        bad += not caught
        print(f"{name:13s} {'caught' if caught else 'NOT CAUGHT'} rc={r.returncode} {time.time() - t0:5.1f}s  "
              f"{(line[0] if line else r.stderr[-300:]).strip()}  failing: {', '.join(sorted(set(fails)))[:120]}")
    return 1 if bad else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inject", action="append", default=[], choices=sorted(INJECTIONS))
    ap.add_argument("--list-injections", action="store_true")
    ap.add_argument("--validate", action="store_true", help="run each injection in a subprocess; each must fail")
    ap.add_argument("--only", action="append", choices=GROUPS)
    ap.add_argument("--verbose", "-v", action="store_true", help="one line per check")
    args = ap.parse_args()
    if args.list_injections:
        for k, (g, v) in INJECTIONS.items():
            print(f"{k:14s} [{g}] {v}")
        return 0
    if args.validate:
        return validate()
    machine.INJECT.update(args.inject)
    only = set(args.only or GROUPS)
    t0 = time.time()
    with np.errstate(invalid="ignore"):
        run(only, np.random.default_rng(20240611))
    elapsed = time.time() - t0
    fails = 0
    summary = {}
    for op, case, err, tol, probs in machine.RESULTS:
        ok = err <= tol and not probs
        fails += not ok
        e = summary.setdefault(op, [0, 0, -1.0, "", tol])
        e[0] += 1
        e[1] += not ok
        if err > e[2] or (not ok and e[1] == 1):
            e[2], e[3] = err, case
        if args.verbose or not ok:
            print(f"{'FAIL' if not ok else 'ok':4s} {op:34s} {case:30s} {err:10.2e} (tol {tol:.0e})"
                  + ("" if not probs else "  " + "; ".join(probs[:4]) + (" ..." if len(probs) > 4 else "")))
    print(f"{'kernel / output':36s} {'cases':>5s} {'failed':>6s} {'worst err':>10s} {'tol':>6s}  worst case")
    for k, (n, nf, w, c, tol) in summary.items():
        print(f"{k:36s} {n:5d} {nf:6d} {w:10.2e} {tol:6.0e}  {c}")
    print("launch shapes (block threads / static shared bytes / launches): "
          + ", ".join(f"{k} {b}/{s}/{c}" for k, (b, s, c) in machine.LAUNCHES.items()))
    stray = [machine.PROBLEMS[i] for i in range(len(machine.PROBLEMS)) if i not in machine.ATTACHED]
    for w, m, n in stray:
        print(f"FAIL (not attached to a check) {w}: {m} (x{n})")
    fails += len(stray)
    launches = sum(c for _, _, c in machine.LAUNCHES.values())
    print(f"\n{len(machine.RESULTS)} checks, {fails} failed, {launches} launches emulated, {elapsed:.1f} s"
          + (f"  [injected: {', '.join(sorted(machine.INJECT))}]" if machine.INJECT else ""))
    return 1 if fails else 0


if __name__ == "__main__":
    sources.check(SOURCES)
    sys.exit(main())
