#!/usr/bin/env bash
# Reproduces adapters/qwen2.5-coder-0.5b-spider from scratch, on the CPU: Qwen2.5-Coder-0.5B-Instruct
# (Q4_K_M GGUF, NF4 base) QLoRA-trained on Spider's training split, 15 whole databases held out for
# validation, then measured by execution on those held-out questions.
#
#   scripts/qwen-spider.sh [data|baseline|train|eval|whole|ship|all]   (default: all, in that order)
#
# Every phase skips what is already done, and `train` resumes from the newest checkpoint, so the
# script can be stopped (Ctrl-C, a kill, the end of a session) and run again. Environment:
#   SPIDER  Spider's training split (train_spider.json, tables.json, database/) [../shared/data/spider-train]
#   RUN     where the data, the run and the predictions go                     [runs/qwen-spider]
#   EVAL_N  evaluate on the first N of the evaluated questions only (a quick look)
# The recipe and why it was chosen: adapters/qwen2.5-coder-0.5b-spider/README.md and
# docs/text-to-sql.md. Time it took here (2026-12-07, Intel Xeon, 2 cores): data 4 min; baseline
# 50 min (beside the training run); train 4.0 h of steps (median 51 s each); eval 10 min for each
# greedy pass (four of them) and 42 min for each pass with 4 candidates (two); whole 4.0 h of steps
# (median 45 s; 40 s once the GEMM ran on AMX tiles), then 7-10 min per greedy pass; ship seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
SPIDER=${SPIDER:-../shared/data/spider-train}
RUN=${RUN:-runs/qwen-spider}
PHASE=${1:-all}
DB="$SPIDER/database"

cargo build --release --bins
S=target/release/sqlora
T=target/release/train
MODEL=$("$S" fetch-model qwen05)
mkdir -p "$RUN/data" "$RUN/pred"
stamp() { echo "[$(date -u +%FT%TZ)] $*" | tee -a "$RUN/log.txt"; }

phase_data() {
    if [ -s "$RUN/data/val.jsonl" ]; then return; fi
    stamp "data: Spider train split, 15 databases held out"
    "$S" prepare spider --spider-dir "$SPIDER" --out "$RUN/data/train.jsonl" \
        --holdout-dbs 15 --val-out "$RUN/data/val.jsonl" --seed 42 | tee -a "$RUN/log.txt"
    # What the run watches while it trains: every 24th held-out question (32, all 15 databases).
    awk 'NR % 24 == 1' "$RUN/data/val.jsonl" > "$RUN/data/val-watch.jsonl"
}

# The measured questions: every other held-out question (381 of 761, all 15 databases). Prompts
# carry whole schemas (742 tokens on average): greedy over all 381 takes ~10 minutes on 2 cores.
questions() {
    awk 'NR % 2 == 1' "$RUN/data/val.jsonl" | head -n "${EVAL_N:-100000}" > "$RUN/data/val-eval.jsonl"
}

# predict NAME QUESTIONS [predict options]: answers for $RUN/data/QUESTIONS.jsonl, then their score.
predict() {
    local name=$1 data="$RUN/data/$2.jsonl"
    shift 2
    if [ -s "$RUN/pred/$name.score.json" ]; then return; fi
    stamp "predict $name $*"
    "$S" predict --model "$MODEL" --data "$data" --db-root "$DB" \
        --out "$RUN/pred/$name.jsonl" --device cpu "$@"
    "$S" eval --data "$data" --pred "$RUN/pred/$name.jsonl" --db-root "$DB" \
        --details "$RUN/pred/$name.details.jsonl" --json > "$RUN/pred/$name.score.json"
    stamp "predict $name done"
}

phase_baseline() {
    questions
    # The untuned instruct model, asked in its own chat format: the fair baseline.
    predict untuned-chat val-eval --prompt chat
}

phase_train() {
    stamp "train (resumes from the newest checkpoint)"
    "$T" --model "$MODEL" --data "$RUN/data/train.jsonl" --val "$RUN/data/val-watch.jsonl" \
        --db-root "$DB" --out "$RUN/train" --device cpu \
        --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --targets all \
        --max-steps 288 --batch 4 --grad-accum 4 --lr 2e-4 --warmup 20 --schedule cosine \
        --group-by-length --max-seq-len 1024 \
        --eval-every 96 --sql-eval-samples 32 --sql-eval-every 0 \
        --save-every 10 --save-total-limit 2 --resume
    stamp "train done"
}

phase_eval() {
    questions
    # Greedy and with 4 candidates, each without and with the schema guard (predict's default).
    predict tuned val-eval --adapter "$RUN/train" --no-guard
    predict tuned-guard val-eval --adapter "$RUN/train"
    predict tuned-cand4 val-eval --adapter "$RUN/train" --candidates 4 --no-guard
    predict tuned-cand4-guard val-eval --adapter "$RUN/train" --candidates 4
    # The guard's rules were settled on the misses of val-eval: the other half of the held-out
    # questions, never looked at, checks them.
    awk 'NR % 2 == 0' "$RUN/data/val.jsonl" > "$RUN/data/val-confirm.jsonl"
    predict tuned-confirm-noguard val-confirm --adapter "$RUN/train" --no-guard
    predict tuned-confirm-guard val-confirm --adapter "$RUN/train"
}

# The second stage, whose adapter is the one shipped: the first stage's adapter trained further on
# prompts that list every table of the database, as the measured prompts do (the first stage's list
# the gold query's tables and two others, and its misses were mostly wrong tables): 128 steps x 16
# examples at 1e-4, another data order. Resumable like `train`; measured greedy with the guard on
# both halves, and without it.
phase_whole() {
    if [ ! -s "$RUN/data/train-whole.jsonl" ]; then
        "$S" prepare spider --spider-dir "$SPIDER" --out "$RUN/data/train-whole.jsonl" \
            --holdout-dbs 15 --val-out "$RUN/data/val-whole.jsonl" --seed 42 --distractors 1000
    fi
    stamp "train, whole-schema stage (resumes from the newest checkpoint)"
    "$T" --model "$MODEL" --init-adapter "$RUN/train" --data "$RUN/data/train-whole.jsonl" \
        --val "$RUN/data/val-watch.jsonl" --db-root "$DB" --out "$RUN/whole" --device cpu \
        --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --targets all --seed 43 \
        --max-steps 128 --batch 4 --grad-accum 4 --lr 1e-4 --warmup 10 --schedule cosine \
        --group-by-length --max-seq-len 1536 \
        --eval-every 64 --sql-eval-samples 32 --sql-eval-every 0 \
        --save-every 5 --save-total-limit 2 --resume
    stamp "train, whole-schema stage done"
    questions
    awk 'NR % 2 == 0' "$RUN/data/val.jsonl" > "$RUN/data/val-confirm.jsonl"
    predict whole-guard val-eval --adapter "$RUN/whole"
    predict whole-confirm-guard val-confirm --adapter "$RUN/whole"
    predict whole-noguard val-eval --adapter "$RUN/whole" --no-guard
    predict whole-cand4-guard val-eval --adapter "$RUN/whole" --candidates 4
}

phase_ship() {
    local dst=adapters/qwen2.5-coder-0.5b-spider
    # The second stage's PEFT files in bf16 (17.6 MB; the run's own are f32), beside the card and
    # both stages' curves.
    "$S" export-adapter --adapter "$RUN/whole" --out "$RUN/export" --dtype bf16
    mkdir -p "$dst"
    cp "$RUN/export/adapter_model.safetensors" "$dst/"
    cp "$RUN/train/curves.png" "$dst/curves-first-stage.png"
    cp "$RUN/whole/curves.png" "$dst/curves.png"
    # The base as PEFT users name it, not this machine's cache path.
    sed 's#"base_model_name_or_path": "[^"]*"#"base_model_name_or_path": "Qwen/Qwen2.5-Coder-0.5B-Instruct"#' \
        "$RUN/export/adapter_config.json" > "$dst/adapter_config.json"
    stamp "shipped to $dst"
}

case "$PHASE" in
    data) phase_data ;;
    baseline) phase_data; phase_baseline ;;
    train) phase_data; phase_train ;;
    eval) phase_eval ;;
    whole) phase_data; phase_whole ;;
    ship) phase_ship ;;
    all) phase_data; phase_baseline; phase_train; phase_eval; phase_whole; phase_ship ;;
    *) echo "unknown phase $PHASE (data, baseline, train, eval, whole, ship, all)" >&2; exit 2 ;;
esac
