#!/usr/bin/env python3
"""Golden outputs for sqlora's tiny models, computed by PyTorch + transformers on the CPU in f32.

For each tiny variant this builds the model with `sqlora tiny-model` (seeded, so the Rust tests can
rebuild the identical bytes), loads it with transformers, and writes tests/reference/golden/<variant>.safetensors:

  input_ids  [24]      random token ids (fixed torch seed)
  logits     [24, V]   model(input_ids).logits, f32
  prompt     [8]       the first 8 input ids
  generated  [<=32]    greedy generate(prompt, max_new_tokens=32), new tokens only (EOS included if hit)

and nf4_dynamic_map.safetensors: the 256-entry map of NF4 double quantization, computed with torch.

The metadata records the FNV-1a 64 fingerprint of the model.safetensors it was made from, so the Rust
test can tell "the engine disagrees" from "the tiny model changed, regenerate the goldens".

Usage (needs torch, transformers, safetensors; run from anywhere in the repo):
    python3 tests/reference/make_golden.py
"""
import json
import pathlib
import subprocess
import tempfile

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "reference" / "golden"
VARIANTS = ["llama", "llama-tied", "qwen2", "qwen2-tied"]
SEQ, PROMPT, NEW = 24, 8, 32


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map for double quantization, computed with torch ops:
    for exponent e in 0..7, the 2^e midpoints of linspace(0.1, 1, 2^e + 1) times 10^(e-6), both signs,
    plus 0 and 1, sorted (bitsandbytes.functional.create_dynamic_map(signed=True))."""
    values = []
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (e - 6) * means).tolist()
        values += (-(10 ** (e - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({"dynamic_map": dynamic_map()}, str(OUT / "nf4_dynamic_map.safetensors"), metadata={"torch": torch.__version__})
    subprocess.run(["cargo", "build", "-q", "--release", "--bin", "sqlora"], cwd=ROOT, check=True)
    exe = ROOT / "target" / "release" / "sqlora"
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([exe, "tiny-model", "--variant", variant, "--out", d], check=True)
            cfg = json.loads((pathlib.Path(d) / "config.json").read_text())
            fingerprint = fnv1a64((pathlib.Path(d) / "model.safetensors").read_bytes())
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            gen = torch.Generator().manual_seed(20261124)
            ids = torch.randint(0, cfg["vocab_size"], (1, SEQ), generator=gen)
            with torch.no_grad():
                logits = model(ids).logits[0].float().contiguous()
                prompt = ids[:, :PROMPT]
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=NEW,
                    do_sample=False,
                    eos_token_id=cfg["eos_token_id"],
                    pad_token_id=cfg["eos_token_id"],
                )
            generated = out[0, PROMPT:].contiguous()
            meta = {
                "variant": variant,
                "weights_fnv1a64": f"{fingerprint:016x}",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
            save_file(
                {"input_ids": ids[0].clone(), "logits": logits, "prompt": prompt[0].clone(), "generated": generated},
                str(OUT / f"{variant}.safetensors"),
                metadata=meta,
            )
            print(f"{variant}: {len(generated)} generated tokens, logits std {logits.std():.3f}, weights {meta['weights_fnv1a64']}")


if __name__ == "__main__":
    main()
