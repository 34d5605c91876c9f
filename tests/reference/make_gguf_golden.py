#!/usr/bin/env python3
"""Golden files for sqlora's GGUF import, from implementations independent of ours.

1. gguf_blocks.safetensors: for every quantization type, random blocks (scale fields set to sane f16
   values) and their values as dequantized by gguf-py (llama.cpp's Python package).
2. gguf_smollm2.safetensors (needs SQLORA_TEST_MODELS with smollm2-135m-instruct.Q4_1.gguf from
   ../shared/tools/fetch-models.sh): transformers' own GGUF loader (tokenizer and model) gives the token
   ids of reference strings, the logits at the last position of a paragraph, and its mean loss.

Usage: pip install torch transformers gguf safetensors numpy; python3 tests/reference/make_gguf_golden.py
"""
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent / "golden"
# type -> (block bytes, byte offsets of its f16 scale fields)
TYPES = {
    "Q4_0": (Q.Q4_0, 18, [0]),
    "Q4_1": (Q.Q4_1, 20, [0, 2]),
    "Q5_0": (Q.Q5_0, 22, [0]),
    "Q5_1": (Q.Q5_1, 24, [0, 2]),
    "Q8_0": (Q.Q8_0, 34, [0]),
    "Q4_K": (Q.Q4_K, 144, [0, 2]),
    "Q5_K": (Q.Q5_K, 176, [0, 2]),
    "Q6_K": (Q.Q6_K, 210, [208]),
}
STRINGS = [
    "SELECT name FROM users WHERE city = 'Oslo';",
    "How many orders were placed in 2024?",
    "Hello, world! 12345 numbers and   spaces\n\ttabs",
    "<|im_start|>user\nWrite SQL.<|im_end|>",
]
PARAGRAPH = (
    "The library opened its doors in the spring. Every morning, students arrived early to find a quiet "
    "table by the window, where the light was best for reading. By noon the reading room was full, and "
    "the librarians walked between the shelves, returning books to their places."
)


def blocks() -> None:
    rng = np.random.default_rng(5)
    tensors = {}
    for name, (qt, size, scales) in TYPES.items():
        raw = rng.integers(0, 256, size=(3, size), dtype=np.uint8)
        for off in scales:
            raw[:, off : off + 2] = rng.uniform(-0.2, 0.2, size=(3, 1)).astype(np.float16).view(np.uint8)
        values = dequantize(raw.reshape(-1), qt).reshape(-1).astype(np.float32)
        tensors[f"{name}.bytes"] = torch.tensor(raw.reshape(-1).astype(np.int32))
        tensors[f"{name}.values"] = torch.tensor(values)
    save_file(tensors, str(OUT / "gguf_blocks.safetensors"))
    print("gguf_blocks:", ", ".join(TYPES))


def smollm2() -> None:
    folder = os.environ.get("SQLORA_TEST_MODELS")
    name = "smollm2-135m-instruct.Q4_1.gguf"
    if not folder or not (pathlib.Path(folder) / name).exists():
        print("SQLORA_TEST_MODELS does not hold", name, "- skipping the model golden")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    tensors = {}
    for i, s in enumerate(STRINGS):
        tensors[f"ids_{i}"] = torch.tensor(tok(s, add_special_tokens=True)["input_ids"], dtype=torch.int64)
    ids = torch.tensor(tok(PARAGRAPH, add_special_tokens=True)["input_ids"], dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    loss = F.cross_entropy(logits[:-1], ids[1:])
    tensors["paragraph_ids"] = ids
    tensors["paragraph_loss"] = loss.reshape(())
    tensors["last_logits"] = logits[-1].contiguous()
    save_file(tensors, str(OUT / "gguf_smollm2.safetensors"))
    print(f"gguf_smollm2: {len(ids)} tokens, mean loss {loss.item():.4f}, ids_0 {tensors['ids_0'].tolist()}")


if __name__ == "__main__":
    blocks()
    smollm2()
