#!/usr/bin/env python3
"""The references issue 7's kernel targets are ratios to, measured with PyTorch on the same GPU and
the same shapes as our criterion benches (benches/cuda_*.rs):

- attention: torch's scaled_dot_product_attention (flash backend where available), causal, bf16,
  8 sequences x 512 tokens, 32 query heads over 8 key/value heads of width 64 (Llama-3.2-1B),
  forward and forward + backward; TFLOP/s counted as `cuda_attention` counts them (the causal half
  of 4 S^2 hd per head forward, twice that backward);
- dense bf16 GEMM (cuBLAS): the TFLOP/s peak MFU is measured against, and the training-shape GEMMs
  the NF4 GEMM is compared with (M = 4096 tokens);
- bf16 GEMV-like products at decode shapes (M = 1 and 16 rows): time and GB/s of the weight bytes,
  the "bf16 cuBLAS GEMV" that the NF4 GEMV should beat about 3x;
- device-to-device copy bandwidth, the limit of the bandwidth-bound kernels.

    python3 benches/compare/torch_limits.py [--json] [--device cuda|cpu] [--quick]

`--device cpu --quick` runs tiny shapes on the CPU: a check that the script works, not a measurement.
Each figure is the median of timed repetitions after warm-up (CUDA events on a GPU).
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(fn, device, reps, warmup=3):
    """Median seconds of fn() over reps runs after warmup."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def attention(device, quick, reps):
    b, s, h, kv, hd = (2, 64, 4, 2, 64) if quick else (8, 512, 32, 8, 64)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(b, h, s, hd, device=device, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(b, kv, s, hd, device=device, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(b, kv, s, hd, device=device, dtype=dtype, generator=gen, requires_grad=True)
    dout = torch.randn(b, h, s, hd, device=device, dtype=dtype, generator=gen)

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        o.backward(dout)

    fwd_flops = b * h * 2 * s * s * hd  # 4 S^2 hd per head, halved by the mask
    t_fwd = timed(fwd, device, reps)
    t_all = timed(fwd_bwd, device, reps)
    t_bwd = max(t_all - t_fwd, 1e-12)
    shape = f"{b}x{s} h{h} kv{kv} hd{hd}"
    return [
        {"what": "sdpa_fwd", "shape": shape, "ms": t_fwd * 1e3, "tflops": fwd_flops / t_fwd / 1e12},
        {"what": "sdpa_bwd", "shape": shape, "ms": t_bwd * 1e3, "tflops": 2 * fwd_flops / t_bwd / 1e12},
        {"what": "sdpa_fwd_bwd", "shape": shape, "ms": t_all * 1e3, "tflops": 3 * fwd_flops / t_all / 1e12},
    ]


def gemms(device, quick, reps):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    peak = [(256, 256, 256)] if quick else [(8192, 8192, 8192)]
    # (M tokens, N out, K in): Llama-3.2-1B's projections at training and decode shapes.
    proj = [(2048, 8192), (8192, 2048), (2048, 2048), (512, 2048)]
    if quick:
        proj = [(128, 256)]
    shapes = [("peak", m, n, k) for m, n, k in peak]
    for n, k in proj:
        for m in ([64, 1] if quick else [4096, 16, 1]):
            shapes.append(("train" if m >= 2048 else "decode", m, n, k))
    for kind, m, n, k in shapes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        t = timed(lambda: x @ w.t(), device, reps)
        weight_bytes = n * k * x.element_size()
        rows.append(
            {
                "what": f"gemm_{kind}",
                "shape": f"m{m} n{n} k{k}",
                "ms": t * 1e3,
                "tflops": 2 * m * n * k / t / 1e12,
                "weight_gbps": weight_bytes / t / 1e9,
            }
        )
    return rows


def copy_bandwidth(device, quick, reps):
    n = (1 << 20) if quick else 4096 * 8192  # bf16 values: the bandwidth bench's largest tensor
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, reps)
    return [{"what": "copy_dtod", "shape": f"{n} bf16", "ms": t * 1e3, "gbps": 2 * src.numel() * 2 / t / 1e9}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a check that the script runs)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("torch_limits.py: no CUDA device (use --device cpu --quick to check the script)")
    rows = []
    for part in (attention, gemms, copy_bandwidth):
        rows += part(args.device, args.quick, args.reps)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    for r in rows:
        r["device"] = device
        r["torch"] = torch.__version__
        if args.json:
            print(json.dumps(r))
        else:
            extra = " ".join(
                f"{k} {r[k]:.1f}" for k in ("tflops", "gbps", "weight_gbps") if k in r
            )
            print(f"{r['what']:<14} {r['shape']:<22} {r['ms']:9.4f} ms  {extra}")


if __name__ == "__main__":
    main()
