#!/usr/bin/env bash
# The exact commands that produced the committed model zoo (zoo/<name>/) and its reports
# (reports/<name>/), on the project's 2-core CPU machine (no GPU). See docs/training.md.
#
#   bash scripts/train_zoo.sh            # everything (about 1 h 45 min on 2 cores)
#   bash scripts/train_zoo.sh mnist      # LeNet + B-LeNet only (about 10 min)
#   bash scripts/train_zoo.sh cifar      # AlexNet + B-AlexNet only
#
# Data: $BRANCHY_DATA_DIR (default ../shared/data here). Each training runs on one
# thread: on this shared 2-core machine two single-threaded runs side by side finish
# sooner than two-threaded ones that fight over the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export BRANCHY_DATA_DIR="${BRANCHY_DATA_DIR:-$(cd .. && pwd)/shared/data}"
PY="${PY:-.venv/bin/python}"
what="${1:-all}"
mkdir -p runs

train() {  # name, then training arguments; logs to runs/<name>.log
    local name="$1"; shift
    nice -n 5 "$PY" -m training.train --threads 1 --no-progress --out "zoo/$name" "$@" \
        >"runs/$name.log" 2>&1
}

if [[ "$what" == all || "$what" == mnist ]]; then
    train lenet --model lenet --dataset mnist --epochs 20 --batch-size 128 \
        --optimizer adam --lr 1e-3 --schedule cosine &
    train b-lenet --model b-lenet --dataset mnist --epochs 20 --batch-size 128 \
        --optimizer adam --lr 1e-3 --schedule cosine --tolerance 0.001 &
    wait
    "$PY" -m training.evaluate --checkpoint zoo/b-lenet --baseline zoo/lenet \
        --latency-threads 1 --latency-onednn off --throughput-threads 1 \
        --throughput-onednn off --repeats 5 --out reports/b-lenet
fi

if [[ "$what" == all || "$what" == cifar ]]; then
    # 55 epochs each, the same recipe and schedule for both, with bfloat16 autocast
    # (--amp) and channels-last, 1.6x faster than float32 here; about 65 min (AlexNet) and
    # 85 min (B-AlexNet) side by side. (The committed runs wrote to runs/e55-out/<name>
    # with --work-dir runs/e55/<name> and were copied into zoo/.) B-AlexNet's thresholds
    # are then re-chosen on the validation split so that it is at least as accurate
    # there as AlexNet; the rule was fixed before the test split was read.
    cifar=(--dataset cifar10 --batch-size 256 --optimizer adam --lr 1e-3
           --schedule cosine --warmup-epochs 1 --augment --amp --channels-last
           --epochs 55)
    train alexnet --model alexnet "${cifar[@]}" &
    train b-alexnet --model b-alexnet "${cifar[@]}" --tolerance 0.005 &
    wait
    "$PY" -m training.calibrate --checkpoint zoo/b-alexnet --match-baseline zoo/alexnet
    "$PY" -m training.evaluate --checkpoint zoo/b-alexnet --baseline zoo/alexnet \
        --latency-threads 1 --latency-onednn on --throughput-threads 1 \
        --throughput-onednn on --latency-samples 2000 --repeats 3 --out reports/b-alexnet
fi
