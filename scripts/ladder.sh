#!/usr/bin/env bash
# The tutorials' ladder on tiny Shakespeare as one sweep: bigram -> MLP -> GPT, each with
# characters and with the GPT-2 BPE (6 runs), then lmlab-compare's table and plot, ranked by
# val/bpc (bits per character: the one loss that compares a char run with a BPE run).
#
#   scripts/ladder.sh                  # every experiment at its own length (3000/3000/2000 steps)
#   STEPS=300 scripts/ladder.sh        # every run 300 steps: a quick look
#   scripts/ladder.sh trainer=gpu      # extra arguments go to lmlab-train
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
EXPERIMENTS="${EXPERIMENTS:-shakespeare_bigram,shakespeare_mlp,shakespeare_gpt_cpu}"
DATA="${DATA:-shakespeare_char,shakespeare_bpe}"

args=()
if [[ -n "${STEPS:-}" ]]; then
  # five validations per run, so that every run still draws a curve
  args+=("trainer.max_steps=$STEPS" "trainer.val_check_interval=$(( STEPS >= 5 ? STEPS / 5 : 1 ))")
fi

status=0
lmlab-train -m "experiment=$EXPERIMENTS" "data=$DATA" "hydra.sweep.dir=$SWEEP_DIR" \
  trainer.enable_progress_bar=false ${args[@]+"${args[@]}"} "$@" || status=$?

mkdir -p "$OUT"
lmlab-compare "$SWEEP_DIR" --markdown "$OUT/ladder.md" --plot "$OUT/ladder.png" \
  --csv "$SWEEP_DIR/ladder.csv"
exit "$status"
