"""The inference server: FastAPI app, dynamic batcher, preprocessing, metrics, admin API."""

__version__ = "0.1.0"
