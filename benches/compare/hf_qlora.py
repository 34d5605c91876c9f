#!/usr/bin/env python3
"""The HF QLoRA baseline that `sqlora bench train` is compared with: transformers + peft +
bitsandbytes on a model of the same named shape with random weights (NF4 + double quantization,
bf16 compute), LoRA r 16 / alpha 32 / dropout 0.05 on all seven linears, gradient checkpointing,
bitsandbytes' paged AdamW 32-bit, batch B x T random tokens with the LM loss on every position.

Needs a CUDA GPU, torch, transformers, peft and bitsandbytes (0.50.2 ships a CUDA 13.0 library).

    python3 benches/compare/hf_qlora.py --shape llama-3.2-1b --batch 8 --seq 512
    python3 benches/compare/hf_qlora.py --all --json > hf.jsonl

Prints tokens/s, ms/step and peak allocated memory (torch.cuda.max_memory_allocated) per shape.
"""
import argparse
import json
import os
import tempfile
import time

import torch

# (arch, hidden, intermediate, layers, heads, kv heads, vocab, tied, rope theta): as in src/bench.rs.
SHAPES = {
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, True, 500000.0),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, 1000000.0),
    "tinyllama-1.1b": ("llama", 2048, 5632, 22, 32, 4, 32000, False, 10000.0),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True, 1000000.0),
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152, True, 100000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def config_of(shape):
    from transformers import LlamaConfig, Qwen2Config

    arch, d, f, layers, heads, kv, vocab, tied, theta = SHAPES[shape]
    common = dict(
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_theta=theta,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if shape == "llama-3.2-1b":
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return LlamaConfig(**common)


def bench(shape, batch, seq, warmup, steps):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        # Random bf16 weights of the shape, saved and loaded back through bitsandbytes' NF4 path.
        AutoModelForCausalLM.from_config(config_of(shape), torch_dtype=torch.bfloat16).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    opt = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = SHAPES[shape][6]
    ids = torch.randint(0, vocab, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "shape": shape,
        "device": torch.cuda.get_device_name(0),
        "batch": batch,
        "seq": seq,
        "timed_steps": steps,
        "tokens_per_s": batch * seq * steps / seconds,
        "ms_per_step": seconds * 1e3 / steps,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "loss": float(loss),
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "bitsandbytes": bnb.__version__,
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--all", action="store_true", help="the four shapes of the DESIGN.md baseline table")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("hf_qlora.py needs a CUDA GPU")
    shapes = ["llama-3.2-1b", "tinyllama-1.1b", "qwen2.5-0.5b", "qwen2.5-1.5b"] if a.all else [a.shape]
    if shapes == [None]:
        raise SystemExit("give --shape NAME or --all")
    for shape in shapes:
        r = bench(shape, a.batch, a.seq, a.warmup, a.steps)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            gib = r["peak_memory_bytes"] / 2**30
            print(f"{shape}: {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step, peak {gib:.1f} GiB", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
