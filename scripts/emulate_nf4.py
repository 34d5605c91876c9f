#!/usr/bin/env python3
"""Lane-level numpy emulator of every kernel in kernels/nf4.cu (+ mma.cuh, common.cuh),
launched as src/engine/cuda/{quantize,ops,gemm,mod}.rs launch them, checked against the CPU spec
(src/model/nf4.rs, src/model/cpu/linear.rs).

  python3 scripts/emulate_nf4.py                  # all checks; exit 1 on any failure
  python3 scripts/emulate_nf4.py --inject swapA   # deliberately broken variants (must fail):
        swapA   mma: af[mi][1] <-> af[mi][2]            (mma.cuh:84-85)
        swapB   mma: bfr[ni][0] <-> bfr[ni][1]          (mma.cuh:90-91)
        bound   tiled fwd store: t <= T instead of t < T (nf4.cu:152)
        nosync  tiled fwd: drop the trailing __syncthreads (nf4.cu:146)
        mid     nf4_code: v >= MID instead of v > MID   (nf4.cu:25)
        qlo     nf4_quantize: e + 1 <= n for the low nibble (nf4.cu:48)
        under   mma store: m < M - 1 instead of m < M      (mma.cuh:102)  -> unwritten outputs
        uninit  Nf4Rows::stage: i < MMA_BN*2 - 1          (nf4.cu:212)   -> uninitialised smem read

Model (the pieces shared with the other emulators are emulators/gpu.py's):
 * threads of a block (or of the whole grid for kernels without shared memory) are a numpy axis;
   warps are groups of 32 consecutive thread ids; shuffles are lane permutations.
 * f32 arithmetic in np.float32.  `acc += a * b` in a plain (non-__fmul_rn) expression is emulated
   as an FMA (nvcc's default --fmad=true contracts it): fma(a,b,c) = f32(f64(a)*f64(b) + f64(c))
   (the product of two f32 is exact in f64; the final double rounding is immaterial at 1e-2).
   Where the kernel uses __fmul_rn/__fadd_rn (quantize, double quantize, dequantize_absmax), it
   relies on *no* contraction; we emulate plain separately rounded f32 ops there.
 * bf16 stored as uint16; f32->bf16 is round-to-nearest-even (NaN -> 0x7FFF as __float2bfloat16_rn).
 * shared memory: NaN/sentinel-filled per block, with a written-mask and per-barrier-interval writer
   and reader thread ids: flags uninitialised reads, and write/write, read-after-write and
   write-after-read by different threads inside one barrier interval.
 * global memory: buffers sized exactly as the Rust wrappers allocate (base addresses assumed
   256-byte aligned, as cudaMalloc gives); every read bounds-checked, every vector load checked for
   natural alignment; outputs poisoned and write-counted (unwritten / written twice / OOB writes).
 * mma.sync m16n8k16 row.col f32.bf16: fragments gathered from 32 lanes per the PTX ISA layout
   (g = lane/4, c = lane%4; A reg i: row g + 8*(i%2), cols 2c + 8*(i/2) + {0,1};
   B reg i: k 2c + 8*i + {0,1}, n g; C reg i: row g + 8*(i/2), col 2c + i%2), D = A@B + C in f32.
"""
import os
import argparse
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/: the emulators package
sys.dont_write_bytecode = True  # no __pycache__ left in scripts/emulators
from emulators import nf4_kernels as kernels  # noqa: E402
from emulators.nf4_kernels import (CU_MID, CU_TABLE, DYN, GEMV_MAX_M, RS_MID, RS_TABLE, blocks_for,  # noqa: E402
                                   gemm_tiles, k_nf4_absmax_mean, k_nf4_dequantize, k_nf4_dequantize_absmax,
                                   k_nf4_double_quantize, k_nf4_gemm_bwd_input, k_nf4_gemm_bwd_input_mma,
                                   k_nf4_gemm_fwd, k_nf4_gemm_fwd_mma, k_nf4_gemv, k_nf4_quantize, mma_tiles)
from emulators.gpu import bf16_bits, bf16_to_f32  # noqa: E402
from emulators.nf4_machine import Ctx, GBuf, f32, same_bits  # noqa: E402
from emulators import sources  # noqa: E402

# The kernel sources this emulator transcribes (emulators/sources.py).
SOURCES = {'kernels/nf4.cu': '9b8805e0902a0889', 'kernels/mma.cuh': '26d0cdc5b3e1f3f4', 'kernels/common.cuh': '6b281844157a8164'}


# ----------------------------------------------------------------------------- CPU reference (spec)
def ref_quantize_blocks(xs, block, code_of):
    n = len(xs)
    nb = -(-n // block)
    pad = np.zeros(nb * block, f32)
    pad[:n] = xs
    blocks = pad.reshape(nb, block)
    valid = (np.arange(nb * block) < n).reshape(nb, block)
    absmax = np.fmax.reduce(np.where(valid, np.abs(blocks), f32(0)), axis=1, initial=f32(0)).astype(f32)
    inv = np.where(absmax > 0, f32(1) / absmax, f32(0)).astype(f32)
    codes = code_of((blocks * inv[:, None]).astype(f32)).reshape(-1)[:n]
    return absmax, codes


def ref_quantize_value(v):
    return (v[..., None] > RS_MID).sum(-1).astype(np.uint8)


def ref_nearest_index(x):
    hi = np.minimum((DYN[None, :] < x.reshape(-1, 1)).sum(1), 255)
    lo = np.maximum(hi - 1, 0)
    xv = x.reshape(-1)
    pick = np.where(np.abs((xv - DYN[lo]).astype(f32)) <= np.abs((DYN[hi] - xv).astype(f32)), lo, hi)
    return pick.astype(np.uint8).reshape(x.shape)


def ref_pack(codes):
    c = codes.astype(np.uint8)
    if len(c) % 2:
        c = np.append(c, np.uint8(0))
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def ref_nf4(xs):
    absmax, codes = ref_quantize_blocks(xs, 64, ref_quantize_value)
    packed = ref_pack(codes)
    offset = f32(np.cumsum(absmax.astype(np.float64))[-1] / len(absmax)) if len(absmax) else f32(0)
    centred = (absmax - offset).astype(f32)
    absmax2, qabsmax = ref_quantize_blocks(centred, 256, ref_nearest_index)
    deq_absmax = ((DYN[qabsmax] * absmax2[np.arange(len(qabsmax)) // 256]).astype(f32) + offset).astype(f32)
    n = len(xs)
    i = np.arange(n)
    code = np.where(i % 2 == 0, packed[i // 2] >> 4, packed[i // 2] & 15)
    deq = (RS_TABLE[code] * deq_absmax[i // 64]).astype(f32)
    return dict(packed=packed, absmax=absmax, offset=offset, absmax2=absmax2, qabsmax=qabsmax,
                deq_absmax=deq_absmax, deq=deq)


# ----------------------------------------------------------------------------- driver
ROWS = []
FAILED = []


QUIET_PASSES = [0]


def report(kernel, case, paths, metric, ok, ctx=None, quiet=False):
    notes = ctx.summary() if ctx is not None and ctx.flags else ""
    ok = ok and not (ctx is not None and ctx.flags)
    if quiet and ok:
        QUIET_PASSES[0] += 1
        return
    ROWS.append((kernel, case, paths, metric, "PASS" if ok else "FAIL", notes))
    if not ok:
        FAILED.append((kernel, case, metric, notes))


def gpu_quantize_chain(xs, n, case, quiet=False):
    """Cuda::nf4_quantize (quantize.rs) as launched, then the host round trip and upload_nf4's
    nf4_dequantize_absmax (ops.rs), then nf4_dequantize (ops.rs) of the whole tensor."""
    ref = ref_nf4(xs[:n])
    nblocks = -(-n // 64)
    # nf4_quantize
    ctx = Ctx("nf4_quantize")
    packed = GBuf(ctx, "packed", np.zeros(-(-n // 2), np.uint8), out=True)
    absmax = GBuf(ctx, "absmax", np.zeros(nblocks, f32), out=True)
    x = GBuf(ctx, "x", xs)
    k_nf4_quantize(ctx, (-(-nblocks // 8), 1, 1), (256, 1, 1), packed, absmax, x, n)
    packed.check_written(); absmax.check_written()
    ok1, d1 = same_bits(packed.a, ref["packed"])
    ok2, d2 = same_bits(absmax.a, ref["absmax"])
    report("nf4_quantize", case, f"grid {-(-nblocks // 8)}x256", f"bytes diff {d1}, absmax diff {d2}", ok1 and ok2, ctx, quiet=quiet)
    # nf4_absmax_mean
    ctx = Ctx("nf4_absmax_mean")
    offset = GBuf(ctx, "offset", np.zeros(1, f32), out=True)
    absmax_in = GBuf(ctx, "absmax", absmax.a)
    k_nf4_absmax_mean(ctx, (1, 1, 1), (1024, 1, 1), offset, absmax_in, nblocks)
    offset.check_written()
    ok, _ = same_bits(offset.a, np.array([ref["offset"]], f32))
    report("nf4_absmax_mean", case, f"1x1024, {-(-nblocks // 1024)} strides", f"offset {offset.a[0]:.9g} vs {ref['offset']:.9g}", ok, ctx, quiet=quiet)
    # nf4_double_quantize
    ctx = Ctx("nf4_double_quantize")
    ng = -(-nblocks // 256)
    qabsmax = GBuf(ctx, "qabsmax", np.zeros(nblocks, np.uint8), out=True)
    absmax2 = GBuf(ctx, "absmax2", np.zeros(ng, f32), out=True)
    k_nf4_double_quantize(ctx, (ng, 1, 1), (256, 1, 1), qabsmax, absmax2, GBuf(ctx, "absmax", absmax.a),
                          GBuf(ctx, "offset", offset.a), GBuf(ctx, "dyn_map", DYN), nblocks)
    qabsmax.check_written(); absmax2.check_written()
    ok1, d1 = same_bits(qabsmax.a, ref["qabsmax"])
    ok2, d2 = same_bits(absmax2.a, ref["absmax2"])
    report("nf4_double_quantize", case, f"grid {ng}x256", f"qabsmax diff {d1}, absmax2 diff {d2}", ok1 and ok2, ctx, quiet=quiet)
    # host: Nf4Tensor::from_quantized (CPU dequantizes the scales); device: upload_nf4
    ctx = Ctx("nf4_dequantize_absmax")
    dabs = GBuf(ctx, "absmax", np.zeros(nblocks, f32), out=True)
    grid, block = blocks_for(nblocks)
    k_nf4_dequantize_absmax(ctx, grid, block, dabs, GBuf(ctx, "qabsmax", qabsmax.a), GBuf(ctx, "absmax2", absmax2.a),
                            GBuf(ctx, "dyn_map", DYN), offset.a[0], nblocks)
    dabs.check_written()
    ok, d = same_bits(dabs.a, ref["deq_absmax"])
    report("nf4_dequantize_absmax", case, f"grid {grid[0]}x256", f"scales diff {d}", ok, ctx, quiet=quiet)
    # nf4_dequantize (the cuBLAS path's scratch fill)
    ctx = Ctx("nf4_dequantize")
    out = GBuf(ctx, "out", np.zeros(n, np.uint16), out=True)
    grid, block = blocks_for(-(-n // 2))
    k_nf4_dequantize(ctx, grid, block, out, GBuf(ctx, "packed", packed.a), GBuf(ctx, "absmax", dabs.a), n)
    out.check_written()
    ok, d = same_bits(out.a, bf16_bits(ref["deq"]))
    report("nf4_dequantize", case, f"grid {grid[0]}x256", f"bf16 diff {d}", ok, ctx, quiet=quiet)
    return packed.a, dabs.a, ref


def quant_cases(rng):
    cases = []
    for n in (1, 63, 64, 65, 1000, 4096 + 37, 300 * 64 + 17, 1500 * 64 + 5):
        cases.append((f"n={n}", rng.normal(0, 0.05, n).astype(f32)))
    z = rng.normal(0, 0.05, 1000).astype(f32)
    z[192:256] = 0
    cases.append(("zero block", z))
    nn = rng.normal(0, 0.05, 1000).astype(f32)
    nn[5] = np.nan
    nn[320:384] = np.nan
    cases.append(("NaN (1 + block)", nn))
    # ties: block 0 has absmax 1 and values exactly on / next to every threshold
    t = np.zeros(200, f32)
    t[0] = 1.0
    t[1:16] = RS_MID
    t[16:31] = np.nextafter(RS_MID, f32(np.inf))
    t[31:46] = np.nextafter(RS_MID, f32(-np.inf))
    t[64:] = rng.normal(0, 0.05, 136).astype(f32)
    cases.append(("threshold ties", t))
    inf = rng.normal(0, 0.05, 300).astype(f32)
    inf[70] = np.inf
    cases.append(("+inf value", inf))
    return cases


def gemm_case(rng, M, N, K, with_bias):
    w = rng.normal(0, 0.05, N * K).astype(f32)
    packed, absmax_dev, ref = gpu_quantize_chain(w, N * K, f"W[{N},{K}]", quiet=True)  # the device path quantizes the weight
    Wd = ref["deq"].astype(np.float64).reshape(N, K)  # CPU spec's dequantized weight (f32)
    x = bf16_bits(rng.normal(0, 1, M * K).astype(f32))
    dy = bf16_bits(rng.normal(0, 1, M * N).astype(f32))
    bias = bf16_bits(rng.normal(0, 0.1, N).astype(f32)) if with_bias else None
    X = bf16_to_f32(x).astype(np.float64).reshape(M, K)
    DY = bf16_to_f32(dy).astype(np.float64).reshape(M, N)
    # linear_fwd: y = x W^T + b; linear_bwd_input: dx = dy W  (float64)
    Yref = X @ Wd.T + (bf16_to_f32(bias).astype(np.float64) if with_bias else 0.0)
    DXref = DY @ Wd
    case = f"M={M} N={N} K={K}{' +bias' if with_bias else ''}"

    def relerr(got, want):
        g = bf16_to_f32(got).astype(np.float64).reshape(want.shape)
        if not np.isfinite(g).all():
            return np.inf
        return float(np.linalg.norm(g - want) / max(np.linalg.norm(want), 1e-30))

    def run_fwd(name, kern, grid, block, extra_stats):
        ctx = Ctx(name)
        y = GBuf(ctx, "y", np.zeros(M * N, np.uint16), out=True)
        args = (y, GBuf(ctx, "x", x), GBuf(ctx, "packed", packed), GBuf(ctx, "absmax", absmax_dev),
                GBuf(ctx, "bias", bias) if with_bias else None, M, N, K)
        stats = {"A16": 0, "Aelem": 0, "Bstage": 0, "Belem": 0, "gemv16B": 0, "gemvElem": 0}
        if extra_stats:
            kern(ctx, grid, block, *args, stats)
        else:
            kern(ctx, grid, block, *args)
        y.check_written()
        e = relerr(y.a, Yref)
        return ctx, e, stats

    def run_bwd(name, kern, grid, block, extra_stats):
        ctx = Ctx(name)
        dx = GBuf(ctx, "dx", np.zeros(M * K, np.uint16), out=True)
        args = (dx, GBuf(ctx, "dy", dy), GBuf(ctx, "packed", packed), GBuf(ctx, "absmax", absmax_dev), M, N, K)
        stats = {"A16": 0, "Aelem": 0, "Bstage": 0, "Belem": 0}
        if extra_stats:
            kern(ctx, grid, block, *args, stats)
        else:
            kern(ctx, grid, block, *args)
        dx.check_written()
        return ctx, relerr(dx.a, DXref), stats

    def mstats(s):
        return f"A 16B/elem {s['A16']}/{s['Aelem']}, B stage/elem {s['Bstage']}/{s['Belem']}"

    grid, block = gemm_tiles(M, N)
    ctx, e, _ = run_fwd("nf4_gemm_fwd", k_nf4_gemm_fwd, grid, block, False)
    report("nf4_gemm_fwd", case, f"grid {grid[0]}x{grid[1]}", f"rel err {e:.2e}", e <= 1e-2, ctx)
    grid, block = mma_tiles(M, N)
    ctx, e, s = run_fwd("nf4_gemm_fwd_mma", k_nf4_gemm_fwd_mma, grid, block, True)
    report("nf4_gemm_fwd_mma", case, f"grid {grid[0]}x{grid[1]}; {mstats(s)}", f"rel err {e:.2e}", e <= 1e-2, ctx)
    if M <= GEMV_MAX_M:  # gemm.rs: Auto adds Gemv for forward shapes with t.next_power_of_two() <= 16
        grid, block = blocks_for(N * 32)
        ctx, e, s = run_fwd("nf4_gemv", k_nf4_gemv, grid, block, True)
        p = "16B loads (K%32==0)" if s["gemv16B"] else "element path"
        report("nf4_gemv", case, f"grid {grid[0]}x256; {p}", f"rel err {e:.2e}", e <= 1e-2, ctx)
    grid, block = gemm_tiles(M, K)
    ctx, e, _ = run_bwd("nf4_gemm_bwd_input", k_nf4_gemm_bwd_input, grid, block, False)
    report("nf4_gemm_bwd_input", case, f"grid {grid[0]}x{grid[1]}", f"rel err {e:.2e}", e <= 1e-2, ctx)
    grid, block = mma_tiles(M, K)
    ctx, e, s = run_bwd("nf4_gemm_bwd_input_mma", k_nf4_gemm_bwd_input_mma, grid, block, True)
    report("nf4_gemm_bwd_input_mma", case, f"grid {grid[0]}x{grid[1]}; {mstats(s)}", f"rel err {e:.2e}", e <= 1e-2, ctx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inject", action="append", default=[],
                    choices=["swapA", "swapB", "bound", "nosync", "mid", "qlo", "under", "uninit"])
    ap.add_argument("--quick", action="store_true", help="fewer cases (for injection runs)")
    args = ap.parse_args()
    kernels.INJECT.update(args.inject)
    t_start = time.time()
    rng = np.random.default_rng(12345)

    # the kernel's constant tables are the CPU's f32 values
    ok_t, dt = same_bits(CU_TABLE, RS_TABLE)
    ok_m, dm = same_bits(CU_MID, RS_MID)
    report("NF4_TABLE/NF4_MID", "nf4.cu vs nf4.rs", "__constant__", f"table diff {dt}, mid diff {dm}", ok_t and ok_m)

    for name, xs in quant_cases(rng):
        if args.quick and len(xs) > 5000:
            continue
        n = len(xs)
        gpu_quantize_chain(xs, n, name if name == f"n={n}" else f"{name}, n={n}")

    shapes = [(1, 64, 64, True), (3, 200, 136, False), (16, 128, 256, True), (17, 96, 200, True),
              (65, 130, 72, False), (70, 256, 192, True), (5, 72, 208, False)]
    if args.quick:
        shapes = [(3, 200, 136, False), (17, 96, 200, True), (70, 256, 192, True)]
    for M, N, K, b in shapes:
        gemm_case(rng, M, N, K, b)

    w = [max(len(str(r[i])) for r in ROWS + [("kernel", "case", "launch / paths", "metric", "ok")]) for i in range(5)]
    hdr = ("kernel", "case", "launch / paths", "metric", "ok")
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)))
    print("  ".join("-" * w[i] for i in range(5)))
    for r in ROWS:
        print("  ".join(str(r[i]).ljust(w[i]) for i in range(5)) + (f"  !! {r[5]}" if r[5] else ""))
    print(f"\n{len(ROWS) + QUIET_PASSES[0]} checks ({QUIET_PASSES[0]} passing quantization checks of the GEMM weights not listed), "
          f"{len(FAILED)} failed; injections: {sorted(kernels.INJECT) or 'none'}; "
          f"{time.time() - t_start:.1f} s")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    sources.check(SOURCES)
    main()
