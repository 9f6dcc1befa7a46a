"""A small client of the branchy-serve server: ``Client``, ``AsyncClient`` and the
``branchy`` command line.

It needs only ``httpx``: importing it never imports torch or the server. ::

    from branchy_client import Client

    with Client("http://127.0.0.1:8000") as client:
        answer = client.classify("b-alexnet", ["cat.jpg"], top_k=3)
        p = answer.predictions[0]
        print(p.class_name, p.confidence, p.exit_index, p.entropy, answer.timings.total_ms)
"""

from branchy_client.client import (
    DEFAULT_URL,
    AdminTokenMissing,
    AsyncClient,
    Client,
    ImageInput,
    read_image,
)
from branchy_client.errors import (
    AdminDisabled,
    BadRequest,
    BranchyError,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    ImageReadError,
    InternalServerError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    RequestTimeout,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)
from branchy_client.results import (
    Classification,
    Expected,
    ModelInfo,
    ModelSummary,
    Prediction,
    ThresholdState,
    Timings,
    TopClass,
)

__all__ = [
    "DEFAULT_URL",
    "AdminDisabled",
    "AdminTokenMissing",
    "AsyncClient",
    "BadRequest",
    "BranchyError",
    "Classification",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Expected",
    "ImageInput",
    "ImageReadError",
    "InternalServerError",
    "InvalidRequest",
    "ModelInfo",
    "ModelSummary",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Prediction",
    "ProtocolError",
    "RequestTimeout",
    "ServerError",
    "ThresholdState",
    "Timings",
    "TopClass",
    "Unauthorized",
    "UnsupportedMediaType",
    "read_image",
]
