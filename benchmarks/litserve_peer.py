"""A peer server for ``benchmarks/serving.py``: LitServe serving a plain checkpoint with
its own dynamic batching, answering the same multipart requests as branchy-serve's
classify route (the same JSON shape, so one client measures both).

Decoding is the server's own (``service.preprocess.preprocess``) and the network runs on
the same runtime ``models.load_engine`` picks for branchy-serve, so what differs is only
the serving around it. LitServe is not a dependency of the project: install the
``bench`` extra (``pip install -e '.[bench]'``).

    .venv/bin/python benchmarks/litserve_peer.py --model-dir zoo/alexnet --port 8100
"""

import argparse
import sys
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="a plain checkpoint folder")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch-size", type=int, default=64, help="requests per batch")
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--runtime", default="auto", help="as BRANCHY_RUNTIME")
    p.add_argument("--precision", default="auto", help="as BRANCHY_PRECISION")
    p.add_argument("--torch-threads", type=int, default=1)
    return p


import litserve as ls  # noqa: E402  (not a dependency of the server: the bench extra)
import torch  # noqa: E402
from fastapi import Request  # noqa: E402

from models import load_checkpoint  # noqa: E402
from service.batcher import Engine  # noqa: E402
from service.preprocess import preprocess  # noqa: E402


class PlainAPI(ls.LitAPI):
    """The plain network behind LitServe's batching: one LitServe batch item per request
    (of one or more images), concatenated into one network batch."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout_ms / 1000.0,
            api_path=f"/v1/models/{args.model_dir.name}/classify",
        )
        self.model_dir: Path = args.model_dir
        self.runtime: str = args.runtime
        self.precision: str = args.precision
        self.threads: int = args.torch_threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.ckpt = load_checkpoint(self.model_dir)
        self.engine = Engine(
            self.ckpt,
            torch.device("cpu"),
            runtime=self.runtime,
            precision=self.precision,
            threads=self.threads,
        )
        self.none = torch.zeros((1, self.engine.num_exits - 1))

    # LitServe reads this annotation at run time (hence no postponed annotations in this
    # file): ``Request`` makes it parse the multipart form and pass the form data here.
    def decode_request(self, request: Request, **kwargs: Any) -> torch.Tensor:
        form = cast(Any, request)
        files = [v for _, v in form.multi_items() if hasattr(v, "file")]
        spec = self.ckpt.input_spec
        return torch.stack([preprocess(f.file.read(), spec, max_pixels=1 << 24) for f in files])

    def batch(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return inputs  # requests of several images: concatenated in predict

    def predict(self, x: list[torch.Tensor], **kwargs: Any) -> list[dict[str, Any]]:
        sizes = [len(t) for t in x]
        xs = torch.cat(x)
        out = self.engine.run(xs, self.none.expand(len(xs), -1).contiguous())
        conf, cls = out.probabilities.max(dim=1)
        rows = [
            {"class_index": c, "confidence": p, "exit": {"index": e}}
            for c, p, e in zip(cls.tolist(), conf.tolist(), out.exit_index.tolist(), strict=True)
        ]
        answers, k = [], 0
        for n in sizes:
            answers.append({"results": rows[k : k + n], "batch_size": len(xs)})
            k += n
        return answers

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return output


def main(args: argparse.Namespace) -> None:
    server = ls.LitServer(PlainAPI(args), accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
