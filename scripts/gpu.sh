#!/usr/bin/env bash
# The GPU checks, in two halves: build here (the GPU machine has no Rust), run there.
#
#   scripts/gpu.sh build   stripped release binaries, the CUDA test binary, the criterion kernel benches
#                          and examples/adapter_logits into .stage/bin (ignored by git; carry per phase
#                          only what it runs, see "Carry lists" below)
#   scripts/gpu.sh run [check|bench|kernels|train]
#                          on the GPU machine, from the repository root, one phase per call: the selftest
#                          and the CUDA tests; `bench train` on each shape with each NF4 GEMM path and
#                          `bench generate`; the criterion kernel benches; a short training run on the
#                          GPU beside the same run on the CPU. Logs go to $OUT (or ./gpu-out).
#   scripts/gpu.sh stage-result   here: Spider split into training and held-out databases, and the two
#                          GGUF models cut into chunks (with their SHA-256 in .stage/result/models.sha256),
#                          under .stage/ (see "Issue 9" below)
#   scripts/gpu.sh result MODEL NAME [train options]
#                          there: the base model's SQL on the held-out databases, QLoRA training
#                          (resumable: at TRAIN_SECONDS, default 480, it checkpoints and stops; run it
#                          again to go on), then the tuned model's SQL, greedy and with CANDIDATES
#                          (default 8) execution-guided candidates; `sqlora eval` of each, in $OUT.
#
# SHAPES, GEMMS and ATTENTIONS override the benchmarked shapes (default: the four of the baseline
# table), NF4 GEMM paths (auto tiled mma cublas) and attention paths (auto; add simple to compare
# with the simple kernels); PARTS (default "train profile generate") picks the parts of `run bench`.
# A device call is limited to 10 minutes: each phase stops starting new work at PHASE_SECONDS
# (default 450) and notes what it skipped, so split a slow run with these (e.g. SHAPES=llama-3.2-1b
# GEMMS=auto ATTENTIONS="auto simple", then PARTS="profile generate").
#
# ---- Runbook for a session with a GPU ---------------------------------------------------------------
#
# Nothing in kernels/*.cu has executed yet. Every kernel compiles for sm_80/86/89/90 with nvcc 13.0
# from pip (no spills in the mma kernels) and is emulated lane by lane in CI (scripts/emulate_*.py);
# the launch wrappers compile against cudarc 0.19. `sqlora selftest` has never run on a GPU. What the
# first run is predicted to show, and what it checks, is in docs/gpu-predictions.md.
#
# 1. Here: `scripts/gpu.sh build`, again every time (.stage/bin goes stale with each kernel change).
#
# 2. Carry lists. The stripped binaries are ~60 MB together (sqlora and train ~12 MB each, the test and
#    bench binaries ~5 MB each), and a call carries at most 64 MiB including the tree, so each phase
#    carries only what it runs:
#      run check     .stage/bin/sqlora  .stage/bin/cuda
#      run bench     .stage/bin/sqlora
#      run kernels   .stage/bin/cuda_*
#      run train     .stage/bin/sqlora  .stage/bin/train
#      result        .stage/bin/sqlora  .stage/bin/train  .stage/result   (~38 MB)
#
# 3. Phases, one per call. Each stops starting new work at PHASE_SECONDS (450), lists what it skipped
#    in skipped.jsonl, and writes at most 4 files to $OUT (a call brings back 8).
#      run check     the selftest with blocking launches (a faulting kernel is named by its own
#                    launch) and the CUDA tests. Fix whatever fails here before anything else.
#      run bench     split it with SHAPES, GEMMS and PARTS; ATTENTIONS="auto simple" compares the two
#                    attention paths; profile.txt holds one step's time per kernel. `bench train` runs
#                    with the default and with each forced GEMM path (SQLORA_NF4_GEMM=tiled|mma|cublas);
#                    `auto` times the paths per shape on first use and keeps the fastest one that
#                    agrees with the tiled kernel.
#      run kernels   torch-limits.jsonl first (the PyTorch references that issue 7's ratios are
#                    measured against), then the criterion benches.
#      run train     the tiny model on the GPU and on the CPU: the curves must agree to bf16 accuracy.
#    If a note says cuBLAS was not found, the pip copy's folder was not on the library path (the
#    script looks for it; see the block after `cd` below).
#
# 4. Issue 9 (Spider, after the checks above). Here: `scripts/gpu.sh stage-result` (14 whole
#    databases held out: 6,257 training and 743 validation questions; the held-out databases, 12 MB;
#    both GGUF models in 60 MB chunks under .stage/models, their SHA-256 in
#    .stage/result/models.sha256). There:
#      - carry one chunk per call into /root, calls less than 30 s apart (the machine goes back after
#        ~30 s idle, and after 30 minutes held in any case), then `cat` the chunks together;
#      - `scripts/gpu.sh result /root/MODEL.gguf NAME --epochs 2 --batch 16` with the carry list
#        above, repeated (again less than 30 s apart) until it prints the tuned model's evaluations.
#    `result` refuses a missing or mis-assembled model (SHA-256), trains for what is left of each call
#    (SIGINT to train alone, so it checkpoints; it also checkpoints every 50 steps), starts a
#    prediction only when the call has time for it (the base's time for the tuned greedy run, 3x the
#    greedy time for the 8 candidates), and copies its files to $OUT after every stage.
#    Then `sqlora convert`, .stage/bin/adapter_logits and tests/reference/check_adapter.py (torch,
#    transformers and peft are on that machine) check the adapter against peft.
#
# 5. Order. A session's device time (30 minutes when this plan was made; the device tool's status
#    gives today's figure) cannot hold all of it. In order:
#      a. run check (~9 min at most);
#      b. one run bench on llama-3.2-1b (SHAPES=llama-3.2-1b GEMMS=auto: issue 7's row);
#      c. issue 9 with SmolLM2-135M (2 chunk calls, then ~3 result calls);
#      d. Qwen2.5-Coder-0.5B (9 chunk calls) if time is left;
#      e. the other benches.
set -uo pipefail
cd "$(dirname "$0")/.."

# cudarc finds libcublas by name: where only a pip copy exists (the GPU machine's torch brings one),
# put its folder on the library path.
if [ "${1:-}" != build ] && [[ "$(ldconfig -p 2>/dev/null)" != *libcublas.so* ]]; then
    for d in $(python3 -c 'import glob, site; print(" ".join(glob.glob(site.getsitepackages()[0] + "/nvidia/cu*/lib")))' 2>/dev/null); do
        [ -e "$d/libcublas.so.13" ] || [ -e "$d/libcublas.so" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi

case "${1:-}" in
build)
    set -e
    SQLORA_REQUIRE_KERNELS=1 cargo build --release --bins --example adapter_logits
    executables() { # the executables cargo built, for the targets named in $1 (a Python regex)
        python3 -c 'import json, re, sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and re.fullmatch(sys.argv[1], m["target"]["name"]):
        print(m["executable"])' "$1"
    }
    test_bin=$(SQLORA_REQUIRE_KERNELS=1 cargo test --release --test cuda --no-run --message-format=json | executables cuda)
    bench_bins=$(SQLORA_REQUIRE_KERNELS=1 cargo bench --no-run --message-format=json | executables 'cuda_.*')
    mkdir -p .stage/bin
    for b in target/release/sqlora target/release/train target/release/examples/adapter_logits $test_bin $bench_bins; do
        strip -o ".stage/bin/$(basename "$b" | sed 's/-[0-9a-f]*$//')" "$b"
    done
    ls -la .stage/bin
    ;;
run)
    # One phase per call (a call has 10 minutes and brings back at most 8 files from $OUT):
    #   check (default): nvidia-smi, the selftest, the CUDA tests        -> 3 logs
    #   bench:   `bench train` per shape and NF4 GEMM path (ATTENTIONS, LORAS: the other paths to
    #            compare), a profiled step per LoRA path, `bench generate`
    #                                                          -> bench.jsonl, bench.err, profile.txt
    #   kernels: the criterion kernel benches, short; torch's references  -> kernel-benches.txt,
    #            (benches/compare/torch_limits.py)                            torch-limits.jsonl
    #   train:   a short run of the tiny model on the GPU and on the CPU   -> train-cuda.log, train-cpu.log
    out=${OUT:-gpu-out}
    mkdir -p "$out"
    bin=.stage/bin
    # Whether there is time to start another piece of work in this call (else say what is skipped).
    time_for() {
        [ "$SECONDS" -lt "${PHASE_SECONDS:-450}" ] && return 0
        echo "{\"skipped\":\"$1\",\"at_s\":$SECONDS}" | tee -a "$out/skipped.jsonl"
        return 1
    }
    case "${2:-check}" in
    check)
        nvidia-smi >"$out/nvidia-smi.txt" 2>&1
        # Blocking launches: a kernel that faults is named by its own launch, not by a later copy.
        CUDA_LAUNCH_BLOCKING=1 timeout 300 "$bin/sqlora" selftest --device cuda >"$out/selftest.txt" 2>&1
        echo "selftest exit $?" >>"$out/selftest.txt"
        grep -v " pass$" "$out/selftest.txt" | tail -n 40
        timeout 240 "$bin/cuda" >"$out/cuda-tests.txt" 2>&1
        echo "cuda tests exit $?" | tee -a "$out/cuda-tests.txt"
        ;;
    bench)
        part() { [[ " ${PARTS:-train profile generate} " == *" $1 "* ]]; }
        if part train; then
            for shape in ${SHAPES:-llama-3.2-1b qwen2.5-0.5b tinyllama-1.1b qwen2.5-1.5b}; do
                for gemm in ${GEMMS:-auto tiled mma cublas}; do
                    for attn in ${ATTENTIONS:-auto}; do
                        for lora in ${LORAS:-tiled}; do
                            time_for "bench train $shape $gemm $attn $lora" || continue
                            if SQLORA_NF4_GEMM=$gemm SQLORA_ATTENTION=$attn SQLORA_LORA=$lora timeout 120 "$bin/sqlora" \
                                bench train --shape "$shape" --batch 8 --seq 512 --device cuda --json \
                                >"$out/last.json" 2>>"$out/bench.err"; then
                                cat "$out/last.json" | tee -a "$out/bench.jsonl"
                            else
                                echo "{\"shape\":\"$shape\",\"gemm\":\"$gemm\",\"attention\":\"$attn\",\"lora\":\"$lora\",\"failed\":true}" \
                                    | tee -a "$out/bench.jsonl"
                            fi
                        done
                    done
                done
            done
        fi
        rm -f "$out/last.json"
        # Where a step's time goes, kernel by kernel, on the first shape, with each LoRA path.
        shape=${SHAPES:-llama-3.2-1b}
        if part profile; then
            for lora in tiled simple; do
                time_for "profile $lora" >&2 || continue
                echo "== SQLORA_LORA=$lora"
                SQLORA_LORA=$lora timeout 120 "$bin/sqlora" bench train --shape "${shape%% *}" --batch 8 --seq 512 \
                    --steps 3 --device cuda --profile 2>>"$out/bench.err"
            done | tee "$out/profile.txt"
        fi
        # Batch-1 greedy decoding of a 1B NF4 model (issue 7's target: >= 1,500 tokens/s), and batched,
        # step by step and replaying a recorded CUDA graph per token.
        if part generate; then
            for graphs in 0 1; do
                for b in 1 16; do
                    time_for "bench generate graphs $graphs batch $b" || continue
                    echo "{\"cuda_graphs\":$graphs}" | tee -a "$out/bench.jsonl"
                    SQLORA_CUDA_GRAPHS=$graphs timeout 120 "$bin/sqlora" bench generate --shape llama-3.2-1b --batch "$b" --reps 1 \
                        --prompt 128 --new-tokens 128 --device cuda --json 2>>"$out/bench.err" | tee -a "$out/bench.jsonl"
                done
            done
        fi
        ;;
    kernels)
        # First what the kernel targets are ratios to: PyTorch's flash SDPA, cuBLAS bf16 GEMMs, the
        # copy (unbuffered, so a timeout keeps the lines already measured).
        PYTHONUNBUFFERED=1 timeout 150 python3 benches/compare/torch_limits.py --json 2>>"$out/kernel-benches.txt" \
            | tee "$out/torch-limits.jsonl"
        # Criterion's smallest sample (10), short warm-up and measurement: a few seconds per bench.
        for b in "$bin"/cuda_*; do
            time_for "$(basename "$b")" || continue
            timeout $(( ${PHASE_SECONDS:-450} + 90 - SECONDS )) "$b" --bench --sample-size 10 --warm-up-time 1 \
                --measurement-time 2 2>&1 | grep -v "^\(Gnuplot\|Benchmarking\|Warning\)" | tee -a "$out/kernel-benches.txt"
        done
        ;;
    train)
        # The same short run on both devices: the loss curves must agree to bf16 accuracy.
        tmp=$(mktemp -d)
        "$bin/sqlora" tiny-model --variant qwen2 --out "$tmp/tiny" >/dev/null
        for dev in cuda cpu; do
            timeout 240 "$bin/train" --model "$tmp/tiny" --out "$tmp/run-$dev" --device "$dev" --max-steps 20 \
                --batch 2 --lora-r 8 --max-seq-len 4096 >"$out/train-$dev.log" 2>&1
            tr '\r' '\n' <"$out/train-$dev.log" | grep -v "^$" | tail -n 3
        done
        ;;
    *)
        echo "scripts/gpu.sh run check|bench|kernels|train" >&2
        exit 2
        ;;
    esac
    ;;
stage-result)
    set -e
    r=.stage/result
    rm -rf "$r" && mkdir -p "$r/db"
    # As `build` builds it (build.rs reruns when SQLORA_REQUIRE_KERNELS changes).
    SQLORA_REQUIRE_KERNELS=1 cargo build --release -q --bin sqlora
    # 14 whole databases (about 7% of the questions) are held out for validation.
    target/release/sqlora prepare spider --spider-dir ../shared/data/spider-train --split train \
        --out "$r/train.jsonl" --holdout-dbs 14 --val-out "$r/val.jsonl"
    for db in $(python3 -c 'import json, sys
print("\n".join(sorted({json.loads(l)["db_id"] for l in open(sys.argv[1])})))' "$r/val.jsonl"); do
        cp -r "../shared/data/spider-train/database/$db" "$r/db/"
    done
    du -sh "$r"
    ../shared/tools/fetch-models.sh "$PWD/.models" all
    for m in .models/*.gguf; do ../shared/tools/stage-split.sh "$m" 60 .stage/models; done
    (cd .models && sha256sum ./*.gguf) >"$r/models.sha256" # `result` checks the reassembled model
    ;;
result)
    model=${2:?usage: scripts/gpu.sh result MODEL.gguf NAME [train options]}
    name=${3:?usage: scripts/gpu.sh result MODEL.gguf NAME [train options]}
    shift 3
    # RUNS: where runs live between calls (/root survives while the GPU machine stays warm);
    # DEVICE: cuda (cpu to try the script on a machine without a GPU).
    r=.stage/result bin=.stage/bin run=${RUNS:-/root}/run-$name out=${OUT:-gpu-out} dev=${DEVICE:-cuda}
    mkdir -p "$run" "$out"
    call=${CALL_SECONDS:-570} k=${CANDIDATES:-8}
    left() { echo $((call - SECONDS - 15)); }
    # At most 8 files come back from a call: the evaluations, the log and the curves. Copied after
    # every stage, so a call that the device stops still brings back what was done.
    collect() {
        for f in pred-base.eval.json pred-tuned.eval.json "pred-tuned-c$k.eval.json" train.log metrics.jsonl curves.svg; do
            if [ -e "$run/$f" ]; then cp "$run/$f" "$out/"; fi
        done
    }
    # A model put together from chunks must be whole: a machine handed back between the chunk calls
    # leaves a short file, or none.
    if [ ! -s "$model" ]; then
        echo "no model at $model: carry its chunks again (calls less than 30 s apart) and cat them" >&2
        exit 1
    fi
    want=$(grep " ./$(basename "$model")\$" "$r/models.sha256" 2>/dev/null | cut -d' ' -f1)
    if [ -n "$want" ] && [ ! -e "$run/model-checked" ]; then
        if [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$want" ]; then
            echo "$model does not match its SHA-256 in $r/models.sha256: cat all of its chunks again" >&2
            exit 1
        fi
        touch "$run/model-checked"
    fi
    # score PRED.jsonl: `sqlora eval` into PRED.eval.json unless it is there (written whole, so a
    # call stopped while scoring leaves nothing and the next call scores again).
    score() {
        local e=${1%.jsonl}.eval.json
        if [ -s "$1" ] && [ ! -s "$e" ]; then
            "$bin/sqlora" eval --data "$r/val.jsonl" --pred "$1" --db-root "$r/db" --json >"$e.tmp" && mv "$e.tmp" "$e"
            cat "$e"
        fi
    }
    # predict NAME SECONDS [predict options]: $run/NAME.jsonl unless it is there, if the call has
    # SECONDS left (a prediction stopped at the call's end writes nothing, since files are written
    # whole: the next call runs it again); then its score. Its time goes to NAME.secs and the end of
    # its log to train.log.
    predict() {
        local what=$1 need=$2 start=$SECONDS
        shift 2
        if [ ! -s "$run/$what.jsonl" ]; then
            if [ "$(left)" -lt "$need" ]; then
                echo "$what: $(left) s left in this call, about $need s needed: next call" | tee -a "$run/train.log"
                return 0
            fi
            timeout "$(left)" "$bin/sqlora" predict --model "$model" --data "$r/val.jsonl" --out "$run/$what.jsonl" \
                --device "$dev" "$@" 2>"$run/$what.log"
            echo "$what: exit $?, $((SECONDS - start)) s" | tee -a "$run/train.log"
            tail -n 5 "$run/$what.log" >>"$run/train.log"
            if [ -s "$run/$what.jsonl" ]; then echo $((SECONDS - start)) >"$run/$what.secs"; fi
            collect
        fi
        score "$run/$what.jsonl"
        collect
    }
    secs_of() { cat "$run/$1.secs" 2>/dev/null || echo 60; }
    # The untuned model is asked in its own chat format (it merely continues our template).
    predict pred-base 60 --prompt chat
    # Train for what is left of this call. One SIGINT makes train checkpoint and stop (--foreground:
    # to train alone; sent again to its process group it would mean "quit now", without a
    # checkpoint); KILL 90 s later. It also checkpoints every 50 steps, so a stop during its final
    # evaluations loses little.
    budget=$((call - SECONDS - 100))
    if [ ! -s "$run/adapter_model.safetensors" ] && [ "$budget" -gt 60 ]; then
        secs=$((budget < ${TRAIN_SECONDS:-480} ? budget : ${TRAIN_SECONDS:-480}))
        save=(--save-every 50)
        if [[ " $* " == *" --save-every "* ]]; then save=(); fi
        timeout --foreground -s INT -k 90 "$secs" "$bin/train" --model "$model" --data "$r/train.jsonl" \
            --val "$r/val.jsonl" --sql-eval-samples 64 --db-root "$r/db" --out "$run" --resume --device "$dev" \
            "${save[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -v "^$" >>"$run/train.log"
        tail -n 4 "$run/train.log"
        collect
    fi
    if [ -s "$run/adapter_model.safetensors" ]; then
        # Greedy (about the base's time), then execution-guided: the greedy answer and CANDIDATES-1
        # sampled ones, chosen on the database (started only with 3x the greedy time left).
        predict pred-tuned "$(secs_of pred-base)" --adapter "$run"
        if [ -s "$run/pred-tuned.jsonl" ]; then
            predict "pred-tuned-c$k" $((3 * $(secs_of pred-tuned))) --adapter "$run" --candidates "$k" --db-root "$r/db"
        fi
    fi
    collect
    ;;
*)
    echo "usage: scripts/gpu.sh build|run|stage-result|result" >&2
    exit 2
    ;;
esac
