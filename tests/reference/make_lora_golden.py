#!/usr/bin/env python3
"""Golden LoRA training quantities for sqlora's tiny models, from PyTorch + transformers + peft (CPU, f32).

For each tiny variant: `sqlora tiny-model --adapter-out` writes the base model and a seeded PEFT
adapter; peft loads the adapter (this is also the check that sqlora's adapter files load in peft);
two sequences with their prompt positions masked are run separately, and the loss is the sum of
per-token cross-entropies over both divided by the number of labelled tokens. Written to
tests/reference/golden/lora-<variant>.safetensors:

  tokens_0, tokens_1     [L_i]     token ids of each sequence
  targets_0, targets_1   [L_i]     next-token targets, -100 where there is no loss
  logits_0               [L_0, V]  logits of sequence 0 with the adapter applied
  loss                   []        mean loss over the labelled tokens of both sequences
  <PEFT name>.grad       [...]     d loss / d every lora_A and lora_B, under PEFT's saved names

Usage: python3 tests/reference/make_lora_golden.py
"""
import pathlib
import subprocess
import tempfile

import torch
import torch.nn.functional as F
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from make_golden import fnv1a64

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "reference" / "golden"
VARIANTS = ["llama", "llama-tied", "qwen2", "qwen2-tied"]
SEQS = [(13, 5), (9, 3)]  # (length, prompt length) of each sequence


def main() -> None:
    subprocess.run(["cargo", "build", "-q", "--release", "--bin", "sqlora"], cwd=ROOT, check=True)
    exe = ROOT / "target" / "release" / "sqlora"
    for variant in VARIANTS:
        with tempfile.TemporaryDirectory() as base, tempfile.TemporaryDirectory() as adapter:
            subprocess.run([exe, "tiny-model", "--variant", variant, "--out", base, "--adapter-out", adapter], check=True)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
            model.train()  # lora_dropout is 0: train mode changes nothing but enables grads
            vocab = model.config.vocab_size
            gen = torch.Generator().manual_seed(7)
            tensors, total, count = {}, 0.0, 0
            for i, (length, prompt) in enumerate(SEQS):
                ids = torch.randint(0, 259, (length,), generator=gen)
                targets = torch.full((length,), -100, dtype=torch.long)
                targets[prompt : length - 1] = ids[prompt + 1 :]
                logits = model(ids[None]).logits[0]
                total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
                count += int((targets != -100).sum())
                tensors[f"tokens_{i}"] = ids
                tensors[f"targets_{i}"] = targets
                if i == 0:
                    tensors["logits_0"] = logits.detach().contiguous()
            loss = total / count
            loss.backward()
            tensors["loss"] = loss.detach().reshape(())
            n = 0
            for name, p in model.named_parameters():
                if "lora_" in name:
                    tensors[name.replace(".default", "") + ".grad"] = p.grad.detach().contiguous()
                    n += 1
            meta = {
                "variant": variant,
                "weights_fnv1a64": f"{fnv1a64((pathlib.Path(base) / 'model.safetensors').read_bytes()):016x}",
                "adapter_fnv1a64": f"{fnv1a64((pathlib.Path(adapter) / 'adapter_model.safetensors').read_bytes()):016x}",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            }
            save_file(tensors, str(OUT / f"lora-{variant}.safetensors"), metadata=meta)
            print(f"lora-{variant}: loss {loss.item():.5f}, {n} adapter tensors, {count} labels")


if __name__ == "__main__":
    main()
