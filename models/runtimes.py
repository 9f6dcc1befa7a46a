"""Executors on the fast CPU runtimes, and :func:`load_engine`, which picks one.

A branchy network's segments (:mod:`models.onnx_export`) run on ONNX Runtime or
OpenVINO; the exit algorithm stays :func:`models.engine.early_exit`. Both runtimes are
optional: a runtime that is not installed, cannot take the export, or does not agree
with the eager engine is skipped (``runtime="auto"``) or replaced by the eager engine
(an explicit runtime), and the engine's :attr:`EarlyExitEngine.reason` says why.

Precision. ``fp32`` on every runtime gives the eager engine's answers up to float
rounding (the agreement check at load compares every exit's logits on a probe batch).
``bf16`` (OpenVINO, on CPUs with native bf16: AVX-512 BF16 or AMX) changes entropies
and so which samples leave where; the thresholds and the calibration figures were
computed in fp32. So ``precision="auto"`` never picks bf16 on its own: bf16 serves only
when asked for by name, and then the engine says that its thresholds were calibrated in
fp32. OpenVINO silently computes in fp32 where the CPU has no bf16; the precision
reported is the one the compiled model reports back, never the one requested.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.branchy import BranchyNet
from models.checkpoint import Checkpoint, load_checkpoint
from models.engine import (
    Array,
    EarlyExits,
    Executor,
    Forwarded,
    TorchExecutor,
    early_exit,
)

logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")

# Largest difference in any exit's logits, relative to max(1, largest reference logit),
# that an fp32 export may show on the probe batch and still count as the same network.
FP32_LOGIT_TOLERANCE = 1e-3


class RuntimeUnavailable(RuntimeError):
    """The runtime is not installed, or cannot run this network at this precision."""


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+@-]+){2,}")


def brief(exc: BaseException) -> str:
    """An exception's message for a reason string that clients may read: its first line,
    at most 200 characters, file paths (runtimes name their source files) left out."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _PATH.sub("<path>", text)
    return text if len(text) <= 200 else text[:197] + "..."


def _numpy_input(x: Tensor) -> np.ndarray:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"this executor takes float32 CPU inputs; got {x.dtype} on {x.device}")
    if x.requires_grad:
        x = x.detach()
    # (the runtimes only read their inputs: the caller's tensor is never changed)
    return x.numpy() if x.is_contiguous() else np.ascontiguousarray(x.numpy())


class _NumpyExecutor:
    """What both runtime executors share: NumPy state between segments, rows taken by
    fancy indexing, results handed back as torch tensors without a copy."""

    runtime = "?"
    precision = "fp32"
    device = torch.device("cpu")

    def __init__(self, net: BranchyNet) -> None:
        self.num_exits = net.num_exits
        self.num_classes = net.num_classes

    def begin(self, x: Tensor) -> np.ndarray:
        return _numpy_input(x)

    def take(self, state: np.ndarray, rows: Tensor) -> np.ndarray:
        return state[rows.numpy()]


class OnnxRuntimeExecutor(_NumpyExecutor):
    """The segments as ONNX Runtime sessions on the CPU execution provider.

    Args:
        net: the network (its segments are exported here).
        threads: intra-op threads per session.
        segments: the exported segments as ONNX bytes (default: exported here).
    """

    runtime = "onnxruntime"

    def __init__(
        self, net: BranchyNet, *, threads: int, segments: Sequence[bytes] | None = None
    ) -> None:
        super().__init__(net)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({brief(exc)})") from None
        from models.onnx_export import export_segments

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self._sessions = [
            ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
            for m in export_segments(net)
        ]
        last = self.num_exits - 1
        self._outputs = [
            ["hidden", "logits", "entropy"] if i < last else ["logits", "entropy"]
            for i in range(self.num_exits)
        ]
        # InferenceSession.run checks the feed's names and wraps errors before it calls
        # the session's compiled run; our feed is always {"x": float32 array}, and at
        # batch 1 the checks cost a third of a small segment (15-50 µs on our 2-core
        # CPU). So call that compiled run directly where this onnxruntime has it.
        self._options = ort.RunOptions()
        self._runs = [
            getattr(s, "_sess", None) and getattr(s._sess, "run", None) for s in self._sessions
        ]
        if not all(self._runs):
            self._runs = [None] * len(self._sessions)

    def segment(self, i: int, state: np.ndarray, *, one: bool) -> tuple[Any, Array, Array]:
        run = self._runs[i]
        if run is not None:
            out = run(self._outputs[i], {"x": state}, self._options)
        else:
            out = self._sessions[i].run(self._outputs[i], {"x": state})
        if len(out) == 3:
            return out[0], out[1], out[2]
        return None, out[0], out[1]


def _is_bf16(hint: object) -> bool:
    """OpenVINO's precision hint names bf16 as ``bf16`` or, in newer releases, as
    ``<Type: 'bfloat16'>``."""
    text = str(hint).lower()
    return "bf16" in text or "bfloat16" in text


@functools.cache
def openvino_has_bf16() -> bool:
    """Whether OpenVINO computes in bf16 on this CPU. Its capabilities list is not
    enough: a one-layer model is compiled with the bf16 hint and the precision it got is read."""
    try:
        import openvino as ov
        import openvino.opset8 as ops

        core = ov.Core()
        if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            return False
        x = ops.parameter([1, 4], ov.Type.f32, name="x")
        model = ov.Model([ops.relu(x)], [x], "probe")
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
        return _is_bf16(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # not installed, or no CPU plugin
        return False


class OpenVinoExecutor(_NumpyExecutor):
    """The segments as OpenVINO compiled models on the CPU, one infer request each.

    Inputs and outputs are shared with NumPy, not copied: a segment's ``hidden`` output
    is the next segment's input as it is. Logits and entropies are copied out before the
    request runs again (the caller keeps them past the next batch).

    Args:
        net: the network.
        threads: inference threads per compiled model.
        segments: the exported segments as ONNX bytes (default: exported here).
        precision: ``fp32`` or ``bf16``.
    """

    runtime = "openvino"

    def __init__(
        self,
        net: BranchyNet,
        *,
        threads: int,
        precision: str = "fp32",
        segments: Sequence[bytes] | None = None,
    ) -> None:
        super().__init__(net)
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeUnavailable(f"openvino is not installed ({brief(exc)})") from None
        from models.onnx_export import export_segments

        if precision == "bf16" and not openvino_has_bf16():
            raise RuntimeUnavailable("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "ENABLE_CPU_PINNING": False,  # the server's other threads share these cores
        }
        segments = segments or _serialized(export_segments(net))
        self._compiled = [core.compile_model(core.read_model(m), "CPU", config) for m in segments]
        # A batch of one (the latency case) runs on models compiled for that static
        # shape: 5-12 % faster than the dynamic ones on our CPU (LeNet, AlexNet).
        singles = []
        for m in segments:
            model = core.read_model(m)
            shape = model.input(0).get_partial_shape()
            shape[0] = 1  # the batch; the other dimensions are static already
            model.reshape({"x": shape})
            singles.append(core.compile_model(model, "CPU", config))
        actual = str(self._compiled[0].get_property("INFERENCE_PRECISION_HINT"))
        self.precision = "bf16" if _is_bf16(actual) else "fp32"
        if self.precision != precision:
            raise RuntimeUnavailable(f"OpenVINO compiled for {actual}, not {precision}")
        self._tensor = ov.Tensor
        names = ("hidden", "logits", "entropy")
        self._requests, self._ports = [], []
        for compiled in (self._compiled, singles):
            self._requests.append([c.create_infer_request() for c in compiled])
            self._ports.append([
                [c.output(n) for n in names if i < self.num_exits - 1 or n != "hidden"]
                for i, c in enumerate(compiled)
            ])  # fmt: skip

    def segment(self, i: int, state: np.ndarray, *, one: bool) -> tuple[Any, Array, Array]:
        single = int(state.shape[0] == 1)
        request = self._requests[single][i]
        # the input is shared with NumPy, not copied (set_input_tensor and infer() cost
        # less than infer(dict) at batch 1)
        request.set_input_tensor(self._tensor(state, shared_memory=True))
        request.infer()
        ports = self._ports[single][i]
        # logits and entropy are copied: the caller may keep them past this request's
        # next run; hidden is consumed by the next segment before that
        z = request.get_tensor(ports[-2]).data.copy()
        e = request.get_tensor(ports[-1]).data.copy()
        hidden = request.get_tensor(ports[0]).data if len(ports) == 3 else None
        return hidden, z, e


def all_exits(executor: Executor, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Every exit's logits and entropies for the whole batch (no sample leaves)."""
    state = executor.begin(x)
    out = []
    for i in range(executor.num_exits):
        state, z, e = executor.segment(i, state, one=x.shape[0] == 1)
        out.append((torch.as_tensor(z), torch.as_tensor(e)))
    return out


def agreement_error(executor: Executor, net: BranchyNet, probe: Tensor) -> float:
    """Largest difference between any exit's logits from ``executor`` and from the
    eager network on ``probe``, relative to ``max(1, largest reference logit)``."""
    with torch.inference_mode():
        reference = net(probe)
        worst = 0.0
        for (z, _), ref in zip(all_exits(executor, probe), reference, strict=True):
            scale = max(1.0, float(ref.abs().max()))
            got = torch.as_tensor(z).to(ref.device)
            worst = max(worst, float((got - ref).abs().max()) / scale)
    return worst


def _probe(net: BranchyNet, n: int = 32) -> Tensor:
    # normalised inputs are roughly standard normal; a fixed seed keeps loads repeatable
    g = torch.Generator().manual_seed(0)
    return torch.randn((n, *net.input_shape), generator=g)


def time_full_paths(
    executors: dict[str, Executor], x: Tensor, *, rounds: int = 5, budget_s: float = 0.4
) -> dict[str, float]:
    """Seconds of one full-path call (nobody leaves early) on ``x``, per executor.

    The executors take turns, a few calls each per round, in an order that rotates every
    round, so that a change in machine load hits all of them alike; each gets the
    minimum over rounds of its round medians (the least disturbed measurement). About
    ``budget_s`` seconds in all, at least one call per executor and round.
    """
    names = list(executors)
    zeros = {n: [0.0] * (executors[n].num_exits - 1) for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: allocations, primitive caches
            early_exit(executors[n], x, zeros[n])
        per_turn = budget_s / (rounds * len(names))
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times: list[float] = []
                stop = time.perf_counter() + per_turn
                while not times or (time.perf_counter() < stop and len(times) < 50):
                    start = time.perf_counter()
                    early_exit(executors[n], x, zeros[n])
                    times.append(time.perf_counter() - start)
                medians[n].append(statistics.median(times))
    return {n: min(m) for n, m in medians.items()}


@dataclass
class EarlyExitEngine(EarlyExits):
    """A checkpoint's network ready for early-exit inference on one executor.

    Attributes:
        checkpoint: the loaded checkpoint (its torch model stays on the CPU or device).
        executor: what runs the segments.
        reason: why this runtime and precision serve (for logs and ``/v1/models``).
        timings: full-path seconds per candidate measured at load (batch-1 and batch-N),
            empty when none were measured.
    """

    checkpoint: Checkpoint
    executor: Executor
    reason: str
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    runtime = Forwarded("executor", str, "``torch``, ``onnxruntime`` or ``openvino``.")
    precision = Forwarded("executor", str, "``fp32``, ``bf16`` or ``fp16``.")
    device = Forwarded("executor", torch.device, "Where the segments run.")
    num_exits = Forwarded("executor", int, "Exits of the network.")

    @property
    def model(self) -> BranchyNet:
        """The eager torch network (the reference; also what training uses)."""
        return self.checkpoint.model

    def _executor(self) -> Executor:
        # early_exit (from EarlyExits): exactly BranchyNet.early_exit's contract, on
        # the runtime chosen for this network
        return self.executor


def _serialized(models: Sequence[Any]) -> list[bytes]:
    return [m.SerializeToString() for m in models]


class _Segments:
    """The network's segments as ONNX bytes, exported on first use and then shared by
    every runtime that loads them (``auto`` builds two)."""

    def __init__(self, net: BranchyNet) -> None:
        self.net = net
        self._bytes: list[bytes] | None = None

    def __call__(self) -> list[bytes]:
        if self._bytes is None:
            from models.onnx_export import export_segments

            self._bytes = _serialized(export_segments(self.net))
        return self._bytes


def _build(
    net: BranchyNet, runtime: str, precision: str, threads: int, segments: _Segments
) -> Executor:
    if runtime == "torch":
        if precision != "fp32":
            raise RuntimeUnavailable("the eager CPU engine serves fp32 only")
        return TorchExecutor(net)
    if runtime == "onnxruntime":
        if precision != "fp32":
            raise RuntimeUnavailable("ONNX Runtime's CPU provider serves fp32 only here")
        return OnnxRuntimeExecutor(net, threads=threads, segments=segments())
    if runtime == "openvino":
        return OpenVinoExecutor(net, threads=threads, precision=precision, segments=segments())
    raise ValueError(f"unknown runtime {runtime!r}; expected auto or one of {RUNTIMES}")


def _try(
    net: BranchyNet,
    runtime: str,
    precision: str,
    threads: int,
    probe: Tensor,
    segments: _Segments,
) -> tuple[Executor | None, str]:
    """The executor, or None and why not (not installed, export failed, disagrees)."""
    from models.onnx_export import ExportError

    try:
        executor = _build(net, runtime, precision, threads, segments)
    except (RuntimeUnavailable, ExportError) as exc:
        return None, str(exc)
    except Exception as exc:  # a runtime's own failure to compile must not stop loading
        return None, f"{type(exc).__name__}: {brief(exc)}"
    if runtime == "torch":
        return executor, "reference"
    try:
        error = agreement_error(executor, net, probe)
    except Exception as exc:
        return None, f"failed on the probe batch: {type(exc).__name__}: {brief(exc)}"
    bound = FP32_LOGIT_TOLERANCE if precision == "fp32" else 0.1
    if not error <= bound:
        return None, f"disagrees with the eager engine (logit error {error:.2e} > {bound:g})"
    return executor, f"agrees with the eager engine (logit error {error:.1e})"


def load_engine(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    device: str | torch.device = "cpu",
    threads: int | None = None,
    timing_batch: int = 64,
    log: Callable[[str], None] | None = None,
) -> EarlyExitEngine:
    """Load a checkpoint and make it ready for early exit on the fastest executor.

    Args:
        path: checkpoint folder, or a checkpoint already loaded (on the CPU).
        runtime: ``auto``, ``torch``, ``onnxruntime`` or ``openvino``. ``auto`` builds every
            installed runtime, keeps those that agree with the eager engine on a probe
            batch, times the full path of each at batch 1 and ``timing_batch`` (a second
            or so in all), and picks the one with the lowest geometric mean of the two
            times. An explicit runtime that is missing or fails falls back to torch, and
            the engine's ``reason`` says so. ``captured``: the torch network at bucketed
            batch sizes, as CUDA graphs on a GPU (:mod:`models.captured`; eager buckets
            on the CPU), opt-in while it is unmeasured on a GPU.
        precision: ``auto`` (fp32, see the module docstring), ``fp32`` or ``bf16``.
        device: ``cpu``, or a CUDA device: then the eager engine serves (the CPU
            runtimes do not run there), or ``captured`` when asked for.
        threads: intra-op threads of the runtimes (default: torch's current setting).
        timing_batch: the larger batch size timed by ``auto``.
        log: where to write the choice (default: this module's logger at INFO).

    Returns:
        The engine; ``engine.runtime``, ``engine.precision`` and ``engine.reason`` say
        what serves and why.

    Raises:
        models.CheckpointError: missing or damaged checkpoint.
        ValueError: unknown runtime or precision.
    """
    if runtime not in ("auto", "captured", *RUNTIMES):
        raise ValueError(
            f"unknown runtime {runtime!r}; expected auto, captured or one of {RUNTIMES}"
        )
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected auto or one of {PRECISIONS}")
    checkpoint = path if isinstance(path, Checkpoint) else load_checkpoint(Path(path))
    device = torch.device(device)
    net = checkpoint.model.eval()
    threads = threads or torch.get_num_threads()
    say = log or logger.info
    name = checkpoint.path.name if checkpoint.path is not None else net.name

    if runtime == "captured":
        return _load_captured(checkpoint, net, device, name, say)
    if device.type != "cpu":
        net.to(device)
        engine = EarlyExitEngine(
            checkpoint, TorchExecutor(net), f"torch: the CPU runtimes do not run on {device}"
        )
        say(f"model {name}: runtime torch fp32 on {device} ({engine.reason})")
        return engine

    wanted = "fp32" if precision == "auto" else precision
    probe = _probe(net)
    segments = _Segments(net)
    if runtime != "auto":
        executor, why = _try(net, runtime, wanted, threads, probe, segments)
        if executor is None:
            logger.warning(
                "model %s: runtime %s %s unavailable (%s); falling back to torch fp32",
                name, runtime, wanted, why,
            )  # fmt: skip
            engine = EarlyExitEngine(
                checkpoint, TorchExecutor(net), f"{runtime} {wanted} unavailable: {why}"
            )
        else:
            engine = EarlyExitEngine(checkpoint, executor, f"asked for {runtime} {wanted}")
            if executor.precision != "fp32":
                engine.reason += "; thresholds were calibrated in fp32"
        say(f"model {name}: runtime {engine.runtime} {engine.precision} ({engine.reason})")
        return engine

    candidates: dict[str, Executor] = {}
    skipped: list[str] = []
    for rt in RUNTIMES:
        executor, why = _try(net, rt, wanted, threads, probe, segments)
        if executor is None:
            skipped.append(f"{rt}: {why}")
        else:
            candidates[rt] = executor
    if not candidates:  # only possible for an explicit bf16 nobody can serve
        executor, _ = _try(net, "torch", "fp32", threads, probe, segments)
        assert executor is not None
        candidates["torch"] = executor
        skipped.append(f"no runtime serves {wanted}; torch fp32 instead")
    one = probe[:1]
    big = probe.repeat((timing_batch + probe.shape[0] - 1) // probe.shape[0], 1, 1, 1)
    big = big[:timing_batch].contiguous()
    at_one, at_big = time_full_paths(candidates, one), time_full_paths(candidates, big)
    timings = {
        rt: {"batch_1_s": at_one[rt], f"batch_{timing_batch}_s": at_big[rt]} for rt in candidates
    }
    scores = {rt: float(np.sqrt(np.prod(list(t.values())))) for rt, t in timings.items()}
    best = min(scores, key=scores.__getitem__)
    shown = ", ".join(
        f"{rt} {t['batch_1_s'] * 1e3:.3f} ms @1 / {t[f'batch_{timing_batch}_s'] * 1e3:.2f} ms "
        f"@{timing_batch}"
        for rt, t in timings.items()
    )
    reason = f"fastest full path of those that agree ({shown})"
    if precision == "auto":
        reason += "; bf16 not considered: thresholds are calibrated in fp32"
    if skipped:
        reason += "; skipped " + "; ".join(skipped)
    engine = EarlyExitEngine(checkpoint, candidates[best], reason, timings)
    say(f"model {name}: runtime {engine.runtime} {engine.precision} ({reason})")
    return engine


def _load_captured(
    checkpoint: Checkpoint,
    net: BranchyNet,
    device: torch.device,
    name: str,
    say: Callable[[str], None],
) -> EarlyExitEngine:
    """``load_engine(runtime="captured")``: bucketed segments, CUDA graphs on a GPU,
    every graph captured here so that no request pays for a capture."""
    from models.captured import CapturedExecutor

    net.to(device)
    executor = CapturedExecutor(net)
    if executor.capture:
        executor.warm(net.input_shape)
        reason = (
            f"asked for captured: {executor.captured} CUDA graphs at buckets {executor.buckets}"
        )
    else:
        reason = f"asked for captured: no CUDA on {device}, buckets {executor.buckets} eagerly"
    engine = EarlyExitEngine(checkpoint, executor, reason)
    say(f"model {name}: runtime captured {engine.precision} on {device} ({reason})")
    return engine
