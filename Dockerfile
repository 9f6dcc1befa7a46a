# syntax=docker/dockerfile:1
# The branchy-serve image: the FastAPI server and the committed model zoo on a CUDA-enabled
# PyTorch runtime. It runs on a CPU-only host too (BRANCHY_DEVICE=auto falls back to the CPU).
#
#   docker build -t branchy-serve:0.1.0 .
#   docker run --rm --gpus all -p 8000:8000 branchy-serve:0.1.0
#
# See docs/deployment.md for compose, Kubernetes and the container's threat model.

# Official PyTorch runtime image: torch 2.5.1 + torchvision 0.20.1, CUDA 12.4, cuDNN 9,
# Python 3.11 (the project needs >= 3.11 and torch <= 2.14.1). Override with
# --build-arg BASE_IMAGE=... to match another CUDA driver.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the project with its runtime dependencies only (no dev or training extras). The
# constraint file pins the base image's CUDA builds of torch and torchvision, so that pip
# can never swap them for other wheels while resolving the project's dependencies. The
# sources are deleted afterwards: the code lives in site-packages, owned by root.
COPY pyproject.toml README.md /tmp/src/
COPY models/ /tmp/src/models/
COPY training/ /tmp/src/training/
COPY service/ /tmp/src/service/
COPY branchy_client/ /tmp/src/branchy_client/
RUN python -c "import torch, torchvision; print(f'torch=={torch.__version__}'); print(f'torchvision=={torchvision.__version__}')" > /tmp/torch-constraints.txt \
    && pip install --constraint /tmp/torch-constraints.txt /tmp/src \
    && rm -rf /tmp/src /tmp/torch-constraints.txt

# An unprivileged user with a fixed numeric id, so that Kubernetes' runAsNonRoot can verify
# it and the state volume's ownership is predictable. It owns only its home (caches) and
# the state folder; the code and the zoo stay root-owned and read-only to it.
RUN groupadd --system --gid 10001 branchy \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/branchy \
        --shell /usr/sbin/nologin branchy \
    && mkdir -p /app/state \
    && chown 10001:10001 /app/state

# The model zoo: one safetensors + JSON checkpoint folder per model (never a pickle).
COPY zoo/ /app/zoo/

ENV BRANCHY_MODEL_REPOSITORY=/app/zoo \
    BRANCHY_HOST=0.0.0.0 \
    BRANCHY_PORT=8000 \
    BRANCHY_STATE_DIR=/app/state

WORKDIR /app
# Threshold changes made through the admin API persist here; share it between replicas.
VOLUME ["/app/state"]
USER 10001:10001
EXPOSE 8000

# The server drains on SIGTERM (stops accepting, finishes accepted requests, then exits);
# give it BRANCHY_GRACEFUL_SHUTDOWN_S plus a margin (compose: stop_grace_period).
STOPSIGNAL SIGTERM

# Liveness only (/healthz answers as soon as the process serves); readiness is /readyz.
# The slim base image has no curl: the check is standard-library Python.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import http.client, os, sys; c = http.client.HTTPConnection('127.0.0.1', int(os.environ.get('BRANCHY_PORT', '8000')), timeout=4); c.request('GET', '/healthz'); sys.exit(0 if c.getresponse().status == 200 else 1)"]

# Exec form: python is PID 1 and receives SIGTERM itself (no shell in between).
CMD ["python", "-m", "service"]
