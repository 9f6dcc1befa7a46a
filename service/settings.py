"""Server settings: one pydantic-settings class read from ``BRANCHY_*`` environment variables.

Invalid values stop start-up with a message naming the setting (see ``service.__main__``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# ``zoo/`` of the working directory: the committed model zoo when the server runs from a
# checkout (scripts/serve.sh starts it at the root), and a meaningful place wherever the
# package is installed, unlike a path next to the installed code (site-packages holds no
# models). The container sets BRANCHY_MODEL_REPOSITORY=/app/zoo.
DEFAULT_REPOSITORY = Path("zoo")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_CHOICES = {
    "runtime": ("auto", "torch", "onnxruntime", "openvino"),
    "precision": ("auto", "fp32", "bf16"),
}
_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
# Keyword option of the component -> the setting that gives it.
_ENGINE_OPTIONS = {o: o for o in ("runtime", "precision", "half_precision", "compile")}
_BATCHER_OPTIONS = {
    "max_batch_size": "max_batch_size",
    "max_delay_s": "max_batch_delay_s",
    "max_queue": "max_queue",
    "early_release": "early_release",
    "adaptive_delay": "adaptive_batch_delay",
}


def _one_of(setting: str, value: str) -> str:
    """``value`` normalised (stripped, lower case) if it is one of ``setting``'s choices.

    Raises:
        ValueError: naming the choices.
    """
    value = value.strip().lower()
    allowed = _CHOICES[setting]
    if value not in allowed:
        raise ValueError(f"{setting} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _parse_runtimes(value: str) -> dict[str | None, str]:
    """``BRANCHY_RUNTIME``: a runtime for every model (``openvino``), or comma-separated
    ``model=runtime`` entries with at most one entry without a model, the runtime of the
    models not named (``auto`` when there is none): ``alexnet=openvino,onnxruntime``.

    Returns:
        Model name (None: the default) -> runtime.

    Raises:
        ValueError: an unknown runtime, an empty entry or model name, a model or the
            default given twice.
    """
    runtimes: dict[str | None, str] = {}
    for entry in value.split(","):
        name, sep, runtime = entry.partition("=")
        model: str | None = name.strip() if sep else None
        runtime = runtime if sep else name
        if model == "" or not runtime.strip():
            raise ValueError(
                f"runtime entry {entry.strip()!r} is empty or names no model; expected "
                "RUNTIME or MODEL=RUNTIME, comma-separated"
            )
        runtime = _one_of("runtime", runtime)
        if model in runtimes:
            raise ValueError(
                "runtime gives " + (f"model {model!r}" if model else "the default") + " twice"
            )
        runtimes[model] = runtime
    runtimes.setdefault(None, "auto")
    return runtimes


class Settings(BaseSettings):
    """Everything an operator can set. Environment variable = ``BRANCHY_`` + upper-case name.

    Attributes:
        model_repository: folder with one checkpoint folder per model (folder name = model
            name); default ``zoo`` under the working directory.
        models: load only these models (comma list in the environment); empty = all.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        host: address uvicorn binds.
        port: TCP port uvicorn binds.
        max_batch_size: images per model batch at most.
        max_batch_delay_ms: how long the oldest queued image may wait for a batch to fill.
        adaptive_batch_delay: wait for a batch to fill no longer than the model's
            per-batch fixed cost, measured at warm-up, when that is shorter than
            ``max_batch_delay_ms`` (waiting longer idles the model for more than the
            wait can save; ``service.batcher.Batcher``). Needs ``warmup_batches`` >= 2.
        max_queue: images waiting per model at most; beyond that requests get 503.
        max_concurrent_requests: requests carrying images in progress at once at most
            (bounds memory held by bodies being read and decoded); beyond that 503.
        request_timeout_s: deadline of a request; images still queued past it are dropped
            before compute and the request answered 504.
        max_body_bytes: largest request body accepted (413 beyond).
        max_images_per_request: most images in one request (413 beyond).
        max_image_pixels: most pixels (width × height) of one image, checked from the
            header before any pixel is decoded (413 beyond).
        max_request_pixels: most pixels of all a request's images together, checked
            from their headers before any is decoded (413 beyond): bounds the decoding
            work one request can ask for.
        max_jpeg_scans: most scans of one JPEG, counted before decoding (413 beyond);
            every scan of a progressive JPEG is another pass over its pixels.
        inline_decode_pixels: a request whose images hold at most this many pixels
            together (read from their headers) is decoded on the event loop instead of in
            a worker thread, saving the thread hop (0, the default = always in a thread:
            on the 2-core CPU inline decoding measured slower, because Pillow releases the
            GIL while decoding and a thread overlaps it with the event loop; see
            docs/serving-performance.md). An HTTP front end, whose loop has no model to
            share the GIL with, decodes up to 4096 pixels inline unless this is set.
        admin_token: bearer token of the admin routes; unset = admin routes off.
        state_dir: where per-model threshold changes are persisted.
        state_poll_s: how often to look for threshold files changed by another replica
            sharing ``state_dir`` (0 = never).
        allow_request_thresholds: whether a request may carry its own thresholds.
        runtime: what runs the network on the CPU: ``auto`` (the fastest installed runtime
            that agrees with the eager engine, measured at load; see
            ``models.load_engine``), ``torch``, ``onnxruntime`` or ``openvino``. On CUDA the
            eager engine serves. A missing or failing runtime falls back to torch, logged.
            Per model: ``alexnet=openvino,b-alexnet=onnxruntime`` (comma-separated
            ``model=runtime`` entries, plus at most one plain runtime for the models not
            named, ``auto`` without one); each named model must be served. ``auto``
            decides at every load, and two close runtimes can swap between restarts: a
            model's entry keeps its runtime.
        precision: ``auto`` (fp32), ``fp32`` or ``bf16`` (OpenVINO on CPUs with native
            bf16; thresholds stay the fp32 calibration's).
        early_release: answer each image as soon as its exit is decided, without waiting
            for the batch's later stages (off by default: on the 2-core CPU it cost
            throughput and p50, see reports/runtimes/early_release.md).
        half_precision: run the model in float16 (CUDA only).
        compile: wrap stages and heads in ``torch.compile`` (CUDA only).
        torch_threads: intra-op threads of torch in the server process (0 = torch's default,
            one per core). On a small or shared machine 1 can be much faster: the event
            loop and image decoding need a core too, and a parallel region whose threads
            are descheduled waits for the slowest.
        http_workers: HTTP front-end processes (default 1; 0 = one process serves
            everything). With N > 0 the main process keeps the models, batchers, metrics
            and admin state and serves them on a private Unix socket, and N front-end
            processes share the public port: they parse and decode classify requests
            and hand the images to the main process's batcher through one Unix socket
            each; every other request they forward to the main process
            (``service.frontend``). On the 2-core CPU one front end served single-image
            requests about 1.8x faster than one process (docs/serving-performance.md).
        warmup_batches: batches run per model at start-up before ``/readyz`` turns 200.
        graceful_shutdown_s: how long SIGTERM waits for accepted requests to finish.
        keep_alive_s: how long an idle keep-alive connection stays open (uvicorn's
            default is 5 s). Longer than the connection pools of common clients keep
            idle connections (httpx 5 s, aiohttp 15 s): a client that reuses a
            connection just as the server closes it sees a transport error instead of
            an answer, a race the soak test hit about once a minute at 5 s.
        log_level: Python logging level name.
        shadow_rate: share of served images sampled for shadow monitoring (0 = off);
            sampled early exits are re-run to the final exit off the request path.
        shadow_queue: shadows waiting per model at most (more are dropped and counted).
        shadow_window: sampled images in the disagreement estimate's window.
        shadow_confidence: level of the estimate's upper confidence bound.
        shadow_budget: disagreement budget exported for the alert rule (and the budget
            auto-tuning certifies).
        autotune: auto-tune every model's thresholds from the shadow window (off by
            default; per model through the admin API).
        autotune_interval_s: seconds between auto-tuning passes.
        autotune_min_samples: re-run images the window needs before a pass may certify
            a change (an evident breach of the budget steps down sooner, uncertified).
        autotune_max_step: largest rise of a threshold per pass, and the size of an
            uncertified step down, in nats.
        autotune_hysteresis: relative cost change below which certified thresholds in
            force are kept.
    """

    model_config = SettingsConfigDict(env_prefix="BRANCHY_", extra="ignore")

    model_repository: Path = DEFAULT_REPOSITORY
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_batch_delay_ms: float = Field(default=2.0, ge=0, le=10_000)
    adaptive_batch_delay: bool = True
    max_queue: int = Field(default=1024, ge=1)
    max_concurrent_requests: int = Field(default=512, ge=1)
    request_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_images_per_request: int = Field(default=64, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    max_request_pixels: int = Field(default=2 * 4096 * 4096, ge=1)
    max_jpeg_scans: int = Field(default=32, ge=1, le=100_000)
    inline_decode_pixels: int = Field(default=0, ge=0, le=1 << 20)
    admin_token: SecretStr | None = None
    state_dir: Path = Path("state")
    state_poll_s: float = Field(default=5.0, ge=0)
    allow_request_thresholds: bool = True
    runtime: str = "auto"
    precision: str = "auto"
    early_release: bool = False
    half_precision: bool = False
    compile: bool = False
    torch_threads: int = Field(default=0, ge=0, le=1024)
    http_workers: int = Field(default=1, ge=0, le=64)
    warmup_batches: int = Field(default=2, ge=0, le=100)
    graceful_shutdown_s: float = Field(default=30.0, gt=0)
    keep_alive_s: int = Field(default=75, ge=1, le=3600)
    log_level: str = "INFO"
    shadow_rate: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    shadow_queue: int = Field(default=256, ge=1, le=1_000_000)
    shadow_window: int = Field(default=2000, ge=10, le=10_000_000)
    shadow_confidence: float = Field(default=0.95, gt=0, lt=1)
    shadow_budget: float = Field(default=0.01, gt=0, lt=1)
    autotune: bool = False
    autotune_interval_s: float = Field(default=30.0, ge=0.05, le=86_400)
    autotune_min_samples: int = Field(default=1000, ge=10)
    autotune_max_step: float = Field(default=0.25, gt=0, allow_inf_nan=False)
    autotune_hysteresis: float = Field(default=0.05, ge=0, lt=1)

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {value!r}")
        return value

    @field_validator("runtime")
    @classmethod
    def _check_runtime(cls, value: str) -> str:
        runtimes = _parse_runtimes(value)  # raises with what is wrong
        return ",".join(
            rt if name is None else f"{name}={rt}"
            for name, rt in sorted(runtimes.items(), key=lambda kv: (kv[0] is not None, kv[0]))
        )

    @field_validator("precision")
    @classmethod
    def _check_choice(cls, value: str, info: ValidationInfo) -> str:
        return _one_of(str(info.field_name), value)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}; got {value!r}")
        return value

    @field_validator("admin_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty variable means "not configured", not "the empty password".
        if value is None or value.get_secret_value() == "":
            return None
        if len(value.get_secret_value()) < 8:
            raise ValueError("admin_token must be at least 8 characters long")
        return value

    @model_validator(mode="after")
    def _check_repository(self) -> Settings:
        root = self.model_repository
        if not root.is_dir():
            where = "" if root.is_absolute() else " (relative paths start at the working directory)"
            raise ValueError(f"model_repository {str(root)!r} is not a directory{where}")
        return self

    def runtime_for(self, model: str) -> str:
        """The runtime ``runtime`` asks for ``model``: its own entry, else the default."""
        runtimes = _parse_runtimes(self.runtime)
        return runtimes.get(model, runtimes[None])

    def runtime_models(self) -> list[str]:
        """The models ``runtime`` names (each must be served)."""
        return sorted(name for name in _parse_runtimes(self.runtime) if name is not None)

    def engine_options(self, model: str) -> dict[str, Any]:
        """The keyword options of ``service.batcher.Engine`` these settings choose for
        ``model``."""
        options = {option: getattr(self, name) for option, name in _ENGINE_OPTIONS.items()}
        options["runtime"] = self.runtime_for(model)
        return options

    def uvicorn_options(self) -> dict[str, Any]:
        """What every uvicorn server of the service runs with: the single process, the
        main process's private socket and each front end."""
        return {
            "log_level": self.log_level.lower(),
            # SIGTERM: stop accepting, let accepted requests finish (up to this long),
            # then run the lifespan shutdown (the batchers drain).
            "timeout_graceful_shutdown": int(self.graceful_shutdown_s),
            # Idle keep-alive connections outlive common clients' pools (see
            # ``keep_alive_s``); a front end's proxy drops its own after half of this.
            "timeout_keep_alive": self.keep_alive_s,
            # Uvicorn's own connection limit answers with plain text; ours (JSON) is in
            # the app.
            "limit_concurrency": None,
            "server_header": False,
        }

    def batcher_options(self) -> dict[str, Any]:
        """The keyword options of ``service.batcher.Batcher`` these settings choose."""
        return {option: getattr(self, name) for option, name in _BATCHER_OPTIONS.items()}

    @property
    def max_batch_delay_s(self) -> float:
        return self.max_batch_delay_ms / 1000.0
