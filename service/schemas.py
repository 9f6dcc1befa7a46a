"""Request and response bodies (pydantic), kept apart from the routes that use them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# JSON has no infinity: a threshold of +infinity ("every sample still in flight leaves at
# this exit") is written as the string "inf", and read back the same way.
Threshold = Annotated[
    float | Literal["inf"],
    Field(description='Entropy threshold in nats; "inf" = every sample leaves at this exit.'),
]
# Strict: JSON true/false or "0.5" are not numbers.
StrictFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ExitInfo(BaseModel):
    index: int = Field(description="0-based index of the exit the image took.")
    count: int = Field(description="Number of exits of the model.")


class TopK(BaseModel):
    class_index: int
    class_name: str
    probability: float


class ImageResult(BaseModel):
    index: int = Field(description="Position of the image in the request.")
    filename: str | None = None
    class_index: int
    class_name: str
    confidence: float = Field(description="Softmax probability of the predicted class.")
    entropy: float = Field(description="Softmax entropy (nats) at the exit taken.")
    exit: ExitInfo
    top_k: list[TopK] | None = None
    queue_wait_ms: float
    inference_ms: float = Field(description="Compute time of the batch the image ran in.")
    batch_size: int = Field(description="Images in that batch.")


class Timings(BaseModel):
    decode_ms: float
    queue_wait_ms: float = Field(description="Longest queue wait of the request's images.")
    inference_ms: float = Field(description="Longest batch compute time of its images.")
    total_ms: float


class ClassifyResponse(BaseModel):
    model: str
    thresholds: list[Threshold] = Field(description="Thresholds the request ran with.")
    results: list[ImageResult]
    timings: Timings


class ModelSummary(BaseModel):
    name: str
    architecture: str
    num_exits: int
    ready: bool


class FailedModel(BaseModel):
    name: str
    error: str = Field(description="Why it could not be loaded (full error in the log).")


class ModelList(BaseModel):
    models: list[ModelSummary]
    failed: list[FailedModel] = Field(
        default_factory=list,
        description="Models of the repository that failed to load and are not served.",
    )


class ModelDetail(BaseModel):
    name: str
    architecture: str
    num_exits: int
    thresholds: list[Threshold]
    threshold_source: str = Field(
        description="checkpoint, admin, autotune, or state (a state file of an older version)."
    )
    classes: list[str]
    input: dict[str, Any]
    device: str
    runtime: str = Field(description="What runs the network: torch, onnxruntime or openvino.")
    precision: str = Field(description="fp32, bf16 or fp16.")
    runtime_reason: str = Field(
        description="Why this runtime serves: the load-time measurements, or a fallback's cause."
    )
    half_precision: bool
    exit_macs: list[int] = Field(description="MACs to reach and evaluate each exit.")
    has_calibration: bool
    metrics: dict[str, Any]


class AdminModelDetail(ModelDetail):
    """The admin view of a model: ``metrics`` keeps the checkpoint's training history."""

    loaded_at: float = Field(description="When this checkpoint was loaded (Unix time).")


class ThresholdUpdate(BaseModel):
    """Exactly one of: explicit ``thresholds``; an accuracy ``tolerance`` (fraction below
    the final exit's accuracy on the calibration data); an absolute accuracy ``target``."""

    model_config = ConfigDict(extra="forbid")

    thresholds: list[StrictFloat | Literal["inf"]] | None = Field(
        default=None,
        description='One value >= 0 per early exit, a JSON number or "inf" (as GET answers).',
        max_length=64,
    )
    tolerance: StrictFloat | None = Field(default=None, ge=0, le=1)
    target: StrictFloat | None = Field(default=None, ge=0, le=1)
    max_disagreement: StrictFloat | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Certify disagreement with the final exit <= this (fraction).",
    )
    max_accuracy_drop: StrictFloat | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Certify the accuracy drop against the final exit <= this (fraction).",
    )
    confidence: StrictFloat | None = Field(
        default=None, gt=0, lt=1, description="1 - delta of a certified choice (default 0.95)."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ThresholdUpdate:
        keys = ("thresholds", "tolerance", "target", "max_disagreement", "max_accuracy_drop")
        given = [k for k in keys if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(keys)}; got {given or 'none'}")
        if self.confidence is not None and given[0] not in keys[3:]:
            raise ValueError("confidence goes with max_disagreement or max_accuracy_drop only")
        return self


class Expected(BaseModel):
    """What the thresholds do on the checkpoint's calibration (validation) data."""

    accuracy: float
    exit_shares: list[float]
    expected_macs: float
    relative_cost: float = Field(description="Expected MACs / MACs of the final exit.")
    calibration_samples: int


class Certificate(BaseModel):
    """The evidence behind risk-controlled thresholds (``models.certify_thresholds``)."""

    risk: str = Field(description="disagreement or accuracy_drop.")
    epsilon: float
    confidence: float
    certified_bound: float = Field(
        description="Upper confidence bound of the risk (<= epsilon) from the tested samples."
    )
    empirical_risk: float
    p_value: float
    tested_samples: int
    path_samples: int


class ThresholdState(BaseModel):
    model: str
    thresholds: list[Threshold]
    source: str
    updated_at: float
    expected: Expected | None = None
    certificate: Certificate | None = None


class ReloadResponse(BaseModel):
    model: str
    architecture: str
    num_exits: int
    thresholds: list[Threshold]
    threshold_source: str
    seconds: float
