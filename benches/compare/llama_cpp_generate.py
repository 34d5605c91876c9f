#!/usr/bin/env python3
"""llama.cpp's generation speed on the CPU: the peer of `sqlora bench generate --device cpu`.

Loads a GGUF with llama_cpp.Llama (CPU only, no GPU layers), evaluates a fixed prompt of N tokens
(random token ids from the vocabulary with a fixed seed, or --text) and then decodes greedily one
token at a time, never stopping at EOS, until M new tokens exist. As in sqlora's bench, the first
new token comes from the prompt's logits and the other M - 1 are decode steps. It reports, as
medians over --reps repetitions after one warm-up run (model load excluded):
  prefill tok/s = prompt tokens / prompt-evaluation seconds
  decode tok/s  = decode steps / decode seconds
from llama.cpp's own timers (llama_perf_context), with wall-clock figures beside them.

Install (builds llama.cpp from source with -march=native; about 15-30 minutes on 2 cores):
    python3 -m venv /tmp/llamaenv
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 \
        /tmp/llamaenv/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
Where /proc/cpuinfo lists amx_* but the VM has not enabled the AMX tile state (our 2-core machines),
that build dies with SIGSEGV (ldtilecfg) in the first eval: build without AMX instead, keeping the
rest of -march=native (AVX-512, VNNI, weight repacking):
    AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$AMX_OFF' -DCMAKE_CXX_FLAGS='$AMX_OFF'" \
        CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamaenv/bin/pip install --no-cache-dir llama-cpp-python==0.3.36

Compare, on the same machine and alternating the two:
    sqlora fetch-model qwen05        # prints the path of the Q4_K_M GGUF
    /tmp/llamaenv/bin/python benches/compare/llama_cpp_generate.py MODEL.gguf --prompt 400 --new-tokens 128
    sqlora bench generate --model MODEL.gguf --prompt 400 --new-tokens 128 --device cpu
Both read the same file and report medians of 3 repetitions. The work per token (matrix shapes,
layers, heads, vocabulary) is the same; the weight formats differ: that file is "Q4_K_M" in name,
but as 896 is no multiple of 256 most of its layer matrices are q5_0 (half of attn_v q8_0; only
ffn_down is q4_K/q6_K), which sqlora requantizes to NF4 (4.5 bits a weight), and its output head
(896 x 151936, a quarter of all weights) is q8_0, which both decode from as it is. llama.cpp also
rounds each activation vector to 8 bits before its dot products; sqlora multiplies the bf16
activations in f32. `--shape qwen2.5-0.5b` instead of `--model` times random NF4 weights of the
same shape, with a bf16 head.
sqlora prints prefill in ms: prefill tok/s here = prompt tokens / that time.
Run both on an otherwise idle machine: with --threads equal to the cores, one other busy process
slows llama.cpp's decode by 10-50x (its threads wait for each other at every op of the graph).
"""
import argparse
import json
import random
import statistics
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def run_once(llm, prompt, new_tokens):
    """One generation: (prefill s, decode s) from llama.cpp's timers, then the same by wall clock."""
    n_vocab = llm.n_vocab()
    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)

    def next_token():  # greedy; reading the logits also synchronizes, which closes llama.cpp's timer
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    t0 = time.perf_counter()
    llm.eval(prompt)
    token = next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = next_token()
    t2 = time.perf_counter()
    perf = llama_cpp.llama_perf_context(llm.ctx)
    assert perf.n_p_eval == len(prompt) and perf.n_eval == new_tokens - 1, (perf.n_p_eval, perf.n_eval)
    return perf.t_p_eval_ms / 1e3, perf.t_eval_ms / 1e3, t1 - t0, t2 - t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="GGUF file (e.g. the path `sqlora fetch-model qwen05` prints)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=400, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens (greedy, no stop at EOS)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--text", help="file whose tokens, repeated as needed, make the prompt")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (off by default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompt < 2 or args.new_tokens < 2:
        ap.error("--prompt and --new-tokens must be at least 2")

    llm = Llama(
        model_path=args.model, n_gpu_layers=0, n_threads=args.threads, n_threads_batch=args.threads,
        n_ctx=args.prompt + args.new_tokens + 16, n_batch=max(512, args.prompt),
        flash_attn=args.flash_attn, verbose=False,
    )
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            ids = llm.tokenize(f.read().encode(), add_bos=False)
        prompt = (ids * (args.prompt // max(len(ids), 1) + 1))[: args.prompt]
    else:
        rng = random.Random(args.seed)
        prompt = [rng.randrange(llm.n_vocab()) for _ in range(args.prompt)]

    run_once(llm, prompt, min(args.new_tokens, 8))  # warm-up: allocations, first-touch of the weights
    runs = [run_once(llm, prompt, args.new_tokens) for _ in range(args.reps)]
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    steps = args.new_tokens - 1
    out = {
        "prefill_tok_s": args.prompt / med[0], "decode_tok_s": steps / med[1],
        "prefill_ms": med[0] * 1e3,
        "wall_prefill_tok_s": args.prompt / med[2], "wall_decode_tok_s": steps / med[3],
        "prompt": args.prompt, "new_tokens": args.new_tokens, "threads": args.threads,
        "reps": args.reps, "flash_attn": args.flash_attn, "llama_cpp_python": llama_cpp.__version__,
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"llama.cpp (llama-cpp-python {out['llama_cpp_python']}), {args.threads} threads, "
              f"prompt {args.prompt}, {args.new_tokens} new tokens, median of {args.reps}: "
              f"prefill {out['prefill_ms']:.1f} ms ({out['prefill_tok_s']:.1f} tok/s); "
              f"decode {out['decode_tok_s']:.1f} tok/s ({1e3 / out['decode_tok_s']:.2f} ms per step); "
              f"wall clock: {out['wall_prefill_tok_s']:.1f} / {out['wall_decode_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
