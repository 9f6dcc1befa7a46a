#!/usr/bin/env bash
# Everything this project measures on a GPU, in one call: the script given to a rented GPU
# machine (one H100/H200, a few minutes per task), which receives only the repository.
# Results land in $OUT (at most 8 files, the transfer's limit), copied after every step,
# so a failure or a timeout still returns what finished. About 4 minutes without the
# trainings (the default), about 10 with TRAIN=1.
#
# Before the call, on the development machine (the data and the service's Python
# dependencies must travel inside the repository, in git-ignored folders):
#   python scripts/pack_files.py pack ../shared/data/cifar10 .device-data/cifar10.pack
#   mkdir -p .device-data/mnist && cp ../shared/data/mnist/t10k-* .device-data/mnist/
#   pip download ... -d .whl fastapi starlette pydantic ...   (see docs/gpu.md)
# On the GPU machine (python3 there has torch):
#   OUT=/some/dir bash scripts/gpu_session.sh
#
# Steps: 1. versions and GPU; 2. the service's dependencies from .whl/; 3. CIFAR-10
# unpacked and checked against the digest in ../shared/data/README.md, the MNIST test
# files against ../shared/data/mnist/SHA256SUMS; 4. plain against branchy nets on the
# eager and the captured engine, and the captured engine's answers
# (python -m benchmarks.gpu.engines); 5. stage-level batching under a simulated stream
# (benchmarks/stage_pool.py); 6. the service on CUDA (python -m benchmarks.gpu.service:
# served answers, half precision, torch.compile, the real out-of-memory split, served
# throughput and latency); with TRAIN=1 only: 7. ResNet-110 and B-ResNet-110 side by
# side within TRAIN_BUDGET seconds each; 7a. the B-AlexNet branch-depth ablation (0-4
# extra conv layers in the first branch) within ABLATION_BUDGET seconds each; 7b.
# ResNet-110 / B-ResNet-110 evaluated on the GPU; 7c. the committed AlexNet / B-AlexNet
# evaluated on the GPU, with the ablation plot; 8. $OUT/gpu-latest.json (python -m
# benchmarks.gpu.summary, also rewritten after every step; commit it as
# reports/gpu-latest.json).
#
# A CPU dry run (tests/test_gpu_session.py) sets DEVICE=cpu, a small PACK and its
# CIFAR_DIGEST, MNIST_DIR, and small ENGINE_ARGS, POOL_ARGS and SERVICE_ARGS (SERVICE=0
# skips step 6).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
PY="${PY:-python3}"
TRAIN_BUDGET="${TRAIN_BUDGET:-240}"
ABLATION_BUDGET="${ABLATION_BUDGET:-100}"
RUNS="${RUNS:-/tmp/gpu-session}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu with a small PACK: a dry run of this script
PACK="${PACK:-.device-data/cifar10.pack}"
MNIST_DIR="${MNIST_DIR:-.device-data/mnist}"
TRAIN="${TRAIN:-0}"
CIFAR_DIGEST="${CIFAR_DIGEST:-f10d4c9e536a564f17fa5e8d68ba087d1235e60cd1f21700e11ff43f0647bbb0}"
mkdir -p "$OUT" "$RUNS"
exec > >(tee "$OUT/session.log") 2>&1
t0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - t0 )) s] $*"; }
failed=()

step "1. machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'
nproc

step "2. service dependencies"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || failed+=(wheels)
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step "3. data"
export BRANCHY_DATA_DIR="$RUNS/data"
rm -rf "$BRANCHY_DATA_DIR"
"$PY" scripts/pack_files.py unpack "$PACK" "$BRANCHY_DATA_DIR/cifar10"
digest=$(cd "$BRANCHY_DATA_DIR/cifar10" && find train test -type f -name '*.jpg' \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
echo "cifar10 digest $digest"
[[ $digest == "$CIFAR_DIGEST" ]] || { echo "CIFAR-10 differs from the shared copy"; exit 1; }
mkdir -p "$BRANCHY_DATA_DIR/mnist"
cp "$MNIST_DIR"/t10k-images-idx3-ubyte.gz "$MNIST_DIR"/t10k-labels-idx1-ubyte.gz \
    "$BRANCHY_DATA_DIR/mnist/" || failed+=(mnist)
(cd "$BRANCHY_DATA_DIR/mnist" && sha256sum -c - <<'SUMS'
cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209  t10k-images-idx3-ubyte.gz
e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920  t10k-labels-idx1-ubyte.gz
SUMS
) || failed+=(mnist)

summary() {  # $OUT/gpu-latest.json from whatever the steps have written so far
    "$PY" -m benchmarks.gpu.summary --engines "$RUNS/engines.json" \
        --service "$RUNS/service/gpu_service.json" --stage-pool "$RUNS/stage_pool.json" \
        --out "$OUT/gpu-latest.json" >/dev/null
}
collect() {  # what has been produced so far into $OUT (it comes back even on a timeout)
    cp "$RUNS/service/gpu_service.json" "$RUNS/engines.json" "$RUNS/stage_pool.json" \
        "$OUT/" 2>/dev/null
    summary
    local dirs
    dirs=$(cd "$RUNS" && ls -d resnet ablation report-* service 2>/dev/null)
    [[ -z $dirs ]] || (cd "$RUNS" && tar -czf "$OUT/reports.tar.gz" --exclude='*.safetensors' \
        --exclude=cache --exclude=data --exclude='work-*' --exclude='last.pt' $dirs) || true
}

step "4. plain against branchy nets, eager and captured engines"
"$PY" -m benchmarks.gpu.engines --zoo zoo --data-dir "$BRANCHY_DATA_DIR" --device "$DEVICE" \
    --cache-dir "$RUNS/cache" --out "$RUNS/engines.json" ${ENGINE_ARGS:-} || failed+=(engines)
collect

step "5. stage-level batching under a simulated stream"
"$PY" benchmarks/stage_pool.py --model-dir zoo/b-alexnet --data-dir "$BRANCHY_DATA_DIR" \
    --device "$DEVICE" --cache-dir "$RUNS/cache" --out "$RUNS/stage_pool.json" \
    ${POOL_ARGS:---images 8192 --batch 16 --target 256 --rounds 5} || failed+=(stage-pool)
collect

if [[ ${SERVICE:-1} == 1 ]]; then  # SERVICE=0: the short dry run skips the servers
step "6. the service on CUDA"
"$PY" -m benchmarks.gpu.service --zoo zoo --data-dir "$BRANCHY_DATA_DIR" \
    --out "$RUNS/service" --device "$DEVICE" ${SERVICE_ARGS:-} || failed+=(service)
collect
fi

if [[ $TRAIN == 1 ]]; then
step "7. ResNet-110 and B-ResNet-110 side by side (budget ${TRAIN_BUDGET} s each)"
PY="$PY" RUNS="$RUNS/resnet" TIME_BUDGET="$TRAIN_BUDGET" DEVICE="$DEVICE" EVALUATE=0 \
    bash scripts/gpu_train_resnet110.sh || failed+=(resnet-training)
collect

# Seven trainings side by side (this ablation alongside the pair) slowed each ResNet-110
# epoch from 5-6 s to 17-20 s on the H200, so the ablation runs after the pair.
step "7a. B-AlexNet with 0-4 extra conv layers in its first branch (budget ${ABLATION_BUDGET} s each)"
read -r -a extra <<<"${EXTRA_TRAIN_ARGS:-}"
mkdir -p "$RUNS/ablation"
ablation_pids=()
for k in 0 1 2 3 4; do  # the committed zoo's B-AlexNet recipe (scripts/train_zoo.sh)
    "$PY" -m training.train --model b-alexnet --b1-extra-convs "$k" --dataset cifar10 \
        --device "$DEVICE" --epochs 60 --time-budget "$ABLATION_BUDGET" --batch-size 256 \
        --optimizer adam --lr 1e-3 --schedule cosine --warmup-epochs 1 --augment \
        --channels-last --threads 1 --no-progress --tolerance 0.005 \
        --cache-dir "$RUNS/resnet/cache" "${extra[@]}" --out "$RUNS/ablation/b-alexnet-k$k" \
        --work-dir "$RUNS/ablation/work-k$k" >"$RUNS/ablation/k$k.log" 2>&1 &
    ablation_pids+=($!)
done
for pid in "${ablation_pids[@]}"; do wait "$pid" || failed+=(ablation-training); done
tail -n 2 "$RUNS"/ablation/k*.log
collect

step "7b. ResNet-110 / B-ResNet-110 on the GPU"
"$PY" -m training.evaluate --checkpoint "$RUNS/resnet/b-resnet110" \
    --baseline "$RUNS/resnet/resnet110" --device "$DEVICE" --latency-samples 1000 \
    --repeats 3 --cache-dir "$RUNS/resnet/cache" --out "$RUNS/report-b-resnet110-gpu" \
    || failed+=(resnet-evaluate)
collect

step "7c. AlexNet / B-AlexNet (committed zoo) on the GPU, with the ablation"
"$PY" -m training.evaluate --checkpoint zoo/b-alexnet --baseline zoo/alexnet --device "$DEVICE" \
    --latency-samples 2000 --repeats 3 --cache-dir "$RUNS/resnet/cache" \
    --ablation $(ls -d "$RUNS"/ablation/b-alexnet-k* 2>/dev/null) \
    --out "$RUNS/report-b-alexnet-gpu" || failed+=(alexnet-evaluate)
collect

fi

step "8. results"
collect
"$PY" -m benchmarks.gpu.summary --engines "$RUNS/engines.json" \
    --service "$RUNS/service/gpu_service.json" --stage-pool "$RUNS/stage_pool.json" \
    --out "$OUT/gpu-latest.json" || failed+=(summary)
for m in resnet110 b-resnet110; do
    [[ -d $RUNS/resnet/$m ]] && tar -cf "$OUT/$m.tar" -C "$RUNS/resnet" "$m"
done
ls -l "$OUT"
echo "failed steps: ${failed[*]:-none}; $(( $(date +%s) - t0 )) s in all"
[[ ${#failed[@]} == 0 ]]
