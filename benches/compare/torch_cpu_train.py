#!/usr/bin/env python3
"""The CPU training peer of `sqlora bench train --device cpu-simd|cpu-bf16|cpu`: PyTorch +
transformers + peft on the CPU, the same work: a model of the named shape with random weights,
LoRA r 16 / alpha 32 on all seven linears (dropout as given; `sqlora bench train` uses 0.05),
AdamW (lr 1e-4), batch B x T random tokens with the LM loss on every position (or, with `--labels N`,
on the last N of each sequence, as in instruction tuning), the given threads.
The base stays unquantized (bitsandbytes' NF4 has no CPU kernels): `--dtype bf16` or `fp32`.

    python3 -m venv venv && venv/bin/pip install torch transformers peft psutil
    venv/bin/python benches/compare/torch_cpu_train.py --shape smollm2-135m --batch 4 --seq 256 --dtype bf16

Prints tokens/s (median over the timed steps, after warm-up) and the process's peak RSS. Run it
alternately with `sqlora bench train` on the same shape, on an otherwise idle machine.
"""
import argparse
import json
import resource
import statistics
import time

import torch

# (arch, hidden, intermediate, layers, heads, kv heads, vocab, tied, rope theta): as in src/bench.rs.
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1000000.0),
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152, True, 100000.0),
    "tiny": ("qwen2", 64, 128, 3, 4, 2, 272, False, 10000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_of(shape, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, d, f, layers, heads, kv, vocab, tied, theta = SHAPES[shape]
    common = dict(hidden_size=d, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rope_theta=theta,
                  max_position_embeddings=4096)
    torch.manual_seed(0)
    if arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    else:
        m = Qwen2ForCausalLM(Qwen2Config(**common))
    return m.to(dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--labels", type=int, default=None, help="labelled positions per sequence (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = get_peft_model(model_of(a.shape, dtype), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=a.lora_dropout, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = SHAPES[a.shape][6]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (a.batch, a.seq), generator=g)
    labels = tokens.clone()
    if a.labels is not None and a.labels < a.seq:
        labels[:, : a.seq - a.labels] = -100  # the model shifts: the last `labels` tokens are targets
    times = []
    for step in range(a.warmup + a.steps):
        start = time.perf_counter()
        out = model(input_ids=tokens, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= a.warmup:
            times.append(time.perf_counter() - start)
    per_step = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = dict(system=f"pytorch {torch.__version__} {a.dtype}", shape=a.shape, batch=a.batch, seq=a.seq,
                  labels=min(a.labels or a.seq, a.seq - 1),
                  threads=a.threads, tokens_per_s=a.batch * a.seq / per_step, ms_per_step=per_step * 1e3,
                  peak_rss_bytes=rss, loss=float(out.loss))
    if a.json:
        print(json.dumps(report))
    else:
        print(f"{report['system']}: {a.shape}, batch {a.batch} x {a.seq}, {a.threads} threads: "
              f"{report['tokens_per_s']:.0f} tokens/s, {report['ms_per_step']:.0f} ms/step, "
              f"peak RSS {rss / 2**30:.2f} GiB, loss {report['loss']:.3f}")


if __name__ == "__main__":
    main()
