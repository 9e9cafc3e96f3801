#!/usr/bin/env bash
# One model, five tokenizers, on tiny Shakespeare: the small CPU GPT (shakespeare_gpt_cpu) at
# the same steps with characters, words, GPT-2's BPE and BPEs of 512 and 2048 tokens trained on
# Shakespeare's training part, then lmlab-compare's table ranked by val/bpb (bits per UTF-8
# byte of the same validation text: the figure that compares them). Every run sees the same
# number of windows of block_size tokens, so the larger tokens see more text per step.
#
#   scripts/tokenizer_table.sh                 # 500 steps each (about 20 minutes on 2 cores)
#   STEPS=2000 scripts/tokenizer_table.sh      # the experiment's own length
#
# Writes $OUT/tokenizers_table.md (OUT=docs by default); runs go to $SWEEP_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/lmlab-train ]] && PATH="$PWD/.venv/bin:$PATH"

OUT="${OUT:-docs}"
STEPS="${STEPS:-500}"
SWEEP_DIR="${SWEEP_DIR:-runs/tokenizers_table/$(date +%Y-%m-%d_%H-%M-%S)}"
args=(experiment=shakespeare_gpt_cpu "trainer.max_steps=$STEPS"
  "trainer.val_check_interval=$(( STEPS >= 5 ? STEPS / 5 : 1 ))" trainer.enable_progress_bar=false)

for vocab in 512 2048; do
  ranks="runs/tokenizers/shakespeare-$vocab.tiktoken"
  [[ -f "$ranks" ]] || lmlab-tokenizer train data=shakespeare_char "vocab_size=$vocab" "out=$ranks"
done

status=0
lmlab-train -m "${args[@]}" data=shakespeare_char,shakespeare_words,shakespeare_bpe \
  "hydra.sweep.dir=$SWEEP_DIR/named" "$@" || status=$?
lmlab-train -m "${args[@]}" data=shakespeare_bpe \
  "data.tokenizer=runs/tokenizers/shakespeare-512.tiktoken,runs/tokenizers/shakespeare-2048.tiktoken" \
  "hydra.sweep.dir=$SWEEP_DIR/trained" "$@" || status=$?

mkdir -p "$OUT"
lmlab-compare "$SWEEP_DIR" --metric val/bpb --markdown "$OUT/tokenizers_table.md" \
  --csv "$SWEEP_DIR/tokenizers_table.csv"
exit "$status"
