#!/usr/bin/env bash
# Train ResNet-110 and B-ResNet-110 on CIFAR-10 on one modern GPU (written for an H100;
# budget: under 10 minutes for both), then evaluate them on that GPU.
#
#   bash scripts/gpu_train_resnet110.sh              # EPOCHS=30 by default
#   EPOCHS=5 bash scripts/gpu_train_resnet110.sh     # a quick check
#
# Speed comes from: the whole decoded training set in GPU memory (training/train.py
# moves it there), augmentation as batched tensor ops on the GPU (no data-loader
# workers), bfloat16 autocast (--amp, the default on CUDA), channels-last memory format,
# torch.compile, and large batches with a one-epoch warm-up and a cosine schedule.
#
# Status: prepared but NOT yet run: the sessions that wrote it had no GPU. No figure for
# these networks is reported anywhere until this script has produced it.
set -euo pipefail
cd "$(dirname "$0")/.."
export BRANCHY_DATA_DIR="${BRANCHY_DATA_DIR:-$(cd .. && pwd)/shared/data}"
PY="${PY:-.venv/bin/python}"
EPOCHS="${EPOCHS:-30}"
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"

common=(--dataset cifar10 --device cuda --epochs "$EPOCHS" --batch-size 512
        --optimizer sgd --lr 0.4 --momentum 0.9 --weight-decay 5e-4
        --schedule cosine --warmup-epochs 1 --augment --amp --channels-last --compile
        --eval-batch-size 2048 --no-progress)

for model in resnet110 b-resnet110; do
    start=$(date +%s)
    "$PY" -m training.train --model "$model" "${common[@]}" --out "$OUT/$model" \
        2>&1 | tee "$OUT/$model.log"
    echo "$model: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/times.txt"
done

"$PY" -m training.evaluate --checkpoint "$OUT/b-resnet110" --baseline "$OUT/resnet110" \
    --device cuda --out "$OUT/report-b-resnet110"
