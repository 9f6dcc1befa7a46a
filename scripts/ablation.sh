#!/usr/bin/env bash
# The seed's branch-depth ablation: B-AlexNet with 0..4 extra Conv(32->32) layers in its
# first branch (--b1-extra-convs), each trained with the same recipe, then one figure of
# final test accuracy against the number of extra layers (reports/ablation/ablation.png).
#
#   EPOCHS=24 bash scripts/ablation.sh     # the zoo's recipe (about 1 h per net on 2 cores)
#   EPOCHS=4 bash scripts/ablation.sh      # a short run; label its figures as such
set -euo pipefail
cd "$(dirname "$0")/.."
export BRANCHY_DATA_DIR="${BRANCHY_DATA_DIR:-$(cd .. && pwd)/shared/data}"
PY="${PY:-.venv/bin/python}"
EPOCHS="${EPOCHS:-24}"
OUT="${OUT:-runs/ablation-e$EPOCHS}"
REPORT="${REPORT:-reports/ablation-e$EPOCHS}"
THREADS="${THREADS:-1}"
mkdir -p "$OUT"

# all five side by side, one thread each (they share the cores; total time is the same)
dirs=()
for k in 0 1 2 3 4; do
    nice -n 5 "$PY" -m training.train --model b-alexnet --b1-extra-convs "$k" \
        --dataset cifar10 --epochs "$EPOCHS" --batch-size 256 --optimizer adam --lr 1e-3 \
        --schedule cosine --warmup-epochs 1 --augment --threads "$THREADS" --no-progress \
        --out "$OUT/b-alexnet-k$k" >"$OUT/b-alexnet-k$k.log" 2>&1 &
    dirs+=("$OUT/b-alexnet-k$k")
done
wait

"$PY" -m training.evaluate --checkpoint "$OUT/b-alexnet-k1" --ablation "${dirs[@]}" \
    --latency-samples 500 --repeats 1 --out "$REPORT"
