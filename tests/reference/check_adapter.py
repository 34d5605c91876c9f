#!/usr/bin/env python3
"""Check that an adapter written by sqlora is a real PEFT adapter: load the base model with
transformers, apply the adapter with peft, and compare the last-position logits of a few prompts
with the ones sqlora computed (examples/adapter_logits.rs).

    cargo run --release --example adapter_logits -- BASE_DIR ADAPTER_DIR ours.safetensors "prompt" ...
    python3 tests/reference/check_adapter.py --base BASE_DIR --adapter ADAPTER_DIR --ours ours.safetensors

BASE_DIR is an HF directory (`sqlora convert` turns a GGUF file into one). Reports, per prompt, the
relative error of the logits and of the adapter's effect on them (adapted minus base logits), and
exits non-zero if either exceeds its tolerance. Runs on the CPU in f32; on a GPU machine as well.
"""
import argparse
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--tol", type=float, default=1e-4, help="on the logits")
    ap.add_argument("--tol-effect", type=float, default=1e-2, help="on the adapter's effect")
    a = ap.parse_args()
    ours = load_file(a.ours)
    base = AutoModelForCausalLM.from_pretrained(a.base, torch_dtype=torch.float32)
    base.eval()
    prompts = sorted(int(k.split("_")[1]) for k in ours if k.startswith("ids_"))
    ids = [ours[f"ids_{i}"].round().long().unsqueeze(0) for i in prompts]
    with torch.no_grad():
        base_logits = [base(input_ids=x).logits[0, -1] for x in ids]
    model = PeftModel.from_pretrained(base, a.adapter)
    model.eval()
    ok = True
    with torch.no_grad():
        for i, x, b in zip(prompts, ids, base_logits):
            want = model(input_ids=x).logits[0, -1]
            got = ours[f"logits_{i}"]
            err, effect = rel(got, want), rel(got - b, want - b)
            size = float((want - b).norm() / b.norm())
            print(f"prompt {i} ({x.shape[1]} tokens): logits rel err {err:.2e}, adapter effect "
                  f"(|adapted - base| / |base| = {size:.2e}) rel err {effect:.2e}")
            ok &= err <= a.tol and effect <= a.tol_effect
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
