"""What ``scripts/gpu_session.sh`` measures on a GPU, one module per check.

- :mod:`benchmarks.gpu.engines`: plain against branchy nets with the same engine
  (eager, captured), throughput and batch-1 latency, and whether the captured engine's
  answers equal the eager engine's on real test images;
- :mod:`benchmarks.gpu.service`: the service on CUDA, which runs the checks
  :mod:`~benchmarks.gpu.check_served`, :mod:`~benchmarks.gpu.check_oom`,
  :mod:`~benchmarks.gpu.check_throughput` and :mod:`~benchmarks.gpu.check_latency`;
- :mod:`benchmarks.gpu.summary`: ``reports/gpu-latest.json`` from their outputs.

Every module also runs on the CPU (the session script's dry run, a test).
"""
