#!/usr/bin/env bash
# The tutorials' ladder on tiny Shakespeare as one sweep: bigram -> MLP -> bag of words -> GPT,
# each with characters and with the GPT-2 BPE (8 runs), then the same four models with a
# 2048-token BPE trained on Shakespeare's training part (4 runs, a second sweep in
# $SWEEP_DIR/trained_bpe),
# then lmlab-compare's table and plot of all of them, ranked by val/bpc (bits per character:
# the one loss that compares a char run with a BPE run).
#
#   scripts/ladder.sh                  # every experiment at its own length (3000/3000/2000/2000)
#   STEPS=300 scripts/ladder.sh        # every run 300 steps: a quick look
#   scripts/ladder.sh trainer=gpu      # extra arguments go to lmlab-train
#   TRAINED_BPE= scripts/ladder.sh     # without the trained-BPE runs
#   DATA=shakespeare_char scripts/ladder.sh   # without GPT-2's BPE: the CPU-sized ladder
#
# The trained BPE is $TRAINED_BPE, made first with `lmlab-tokenizer train` if it is not there
# (seconds); GPT-2's 50257 tokens make the output layer most of each model, 2048 do not.
#
# Writes $OUT/ladder.md (table, plot, samples of the best run) and $OUT/ladder.png
# (OUT=docs by default), and the CSV next to the runs in $SWEEP_DIR. Exits non-zero when a
# run failed, after writing the report (which shows the failed run and its error).
# On a 2-core CPU the full length takes hours, most of it the MLP with BPE (its output layer
# is 512 x 50257); a GPU takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/lmlab-train ]] && PATH="$PWD/.venv/bin:$PATH"

OUT="${OUT:-docs}"
SWEEP_DIR="${SWEEP_DIR:-runs/ladder/$(date +%Y-%m-%d_%H-%M-%S)}"
EXPERIMENTS="${EXPERIMENTS:-shakespeare_bigram,shakespeare_mlp,shakespeare_bow,shakespeare_gpt_cpu}"
DATA="${DATA:-shakespeare_char,shakespeare_bpe}"
TRAINED_BPE="${TRAINED_BPE-runs/tokenizers/shakespeare-2048.tiktoken}"

args=()
if [[ -n "${STEPS:-}" ]]; then
  # five validations per run, so that every run still draws a curve
  args+=("trainer.max_steps=$STEPS" "trainer.val_check_interval=$(( STEPS >= 5 ? STEPS / 5 : 1 ))")
fi

if [[ -n "$TRAINED_BPE" && ! -f "$TRAINED_BPE" ]]; then
  lmlab-tokenizer train data=shakespeare_char vocab_size=2048 "out=$TRAINED_BPE"
fi

status=0
lmlab-train -m "experiment=$EXPERIMENTS" "data=$DATA" "hydra.sweep.dir=$SWEEP_DIR" \
  trainer.enable_progress_bar=false ${args[@]+"${args[@]}"} "$@" || status=$?
if [[ -n "$TRAINED_BPE" ]]; then
  # data.tokenizer shows in the table as the column that tells these runs from GPT-2's
  lmlab-train -m "experiment=$EXPERIMENTS" data=shakespeare_bpe "data.tokenizer=$TRAINED_BPE" \
    "hydra.sweep.dir=$SWEEP_DIR/trained_bpe" trainer.enable_progress_bar=false \
    ${args[@]+"${args[@]}"} "$@" || status=$?
fi

mkdir -p "$OUT"
lmlab-compare "$SWEEP_DIR" --markdown "$OUT/ladder.md" --plot "$OUT/ladder.png" \
  --csv "$SWEEP_DIR/ladder.csv"
exit "$status"
