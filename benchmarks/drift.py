"""Thresholds under drift, on a real server: fixed, auto-tuned, and a greedy tuner.

The stream is the test split in windows, each window's images with Gaussian pixel noise
of a growing standard deviation, encoded as PNG (lossless, so the server sees exactly
the pixels the offline reference sees). Three policies on the same stream and budget
(disagreement with the final exit ≤ ε), all starting from the thresholds the server
certifies on the checkpoint's validation data (``PUT .../thresholds
{"max_disagreement": ε, "confidence": 1 - δ}``):

* ``autotune``: a real ``python -m service`` process with shadow monitoring at
  ``--shadow-rate`` and auto-tuning on (``service/autotune.py``: certified re-choice,
  cap per upward step, alarm, hysteresis). The stream is sent to it request by request;
  its answers (exit and class of every image) are what the policy served, and its
  ``/metrics`` (shadow estimate and bound) and ``GET /admin/models/{name}/autotune``
  (thresholds, status) are read after every window;
* ``fixed``: the starting thresholds, never changed;
* ``greedy`` (Apparate-style, same budget and pace): replayed offline on the same images:
  after every ``--min-samples`` sampled images (the sample rate is the shadow rate) it
  picks the cheapest thresholds whose disagreement on that sample is ≤ ε
  (``models.calibration.cheapest_within_risk``, no confidence margin), at most
  ``--max-step`` nats above the thresholds in force, and applies them to the images that
  follow.

The *true* disagreement of a window is computed offline: every image of the window run
through the full network (every exit, eager PyTorch); a served answer disagrees when its
class differs from the final exit's. ``final_exit_match`` is the share of the server's
final-exit answers equal to that offline final answer (the server's runtime against
eager PyTorch; 1.0 up to float rounding). A violation is a window after the first whose
true disagreement exceeds ε + 0.5 pp. ::

    BRANCHY_DATA_DIR=../shared/data python benchmarks/drift.py --checkpoint zoo/b-lenet \\
        --out reports/drift

Writes ``drift-<model>.json``, ``drift-<model>.md`` and ``drift-<model>.png``.
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402
from models.calibration import cheapest_within_risk, exits_taken  # noqa: E402
from testsupport.server import ServerProcess  # noqa: E402
from training import data as data_mod  # noqa: E402
from training.fidelity import cpu_name  # noqa: E402
from training.measure import calibration_on as _calibration_on  # noqa: E402

POLICIES = ("fixed", "autotune", "greedy")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "zoo" / "b-lenet")
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--window-size", type=int, default=1000)
    p.add_argument("--max-noise", type=float, default=0.5, help="pixel noise std at the end")
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--shadow-rate", type=float, default=0.5)
    p.add_argument("--min-samples", type=int, default=500, help="BRANCHY_AUTOTUNE_MIN_SAMPLES")
    p.add_argument("--max-step", type=float, default=0.25, help="BRANCHY_AUTOTUNE_MAX_STEP")
    p.add_argument("--hysteresis", type=float, default=0.05, help="BRANCHY_AUTOTUNE_HYSTERESIS")
    p.add_argument("--interval", type=float, default=0.5, help="BRANCHY_AUTOTUNE_INTERVAL_S")
    p.add_argument("--images-per-request", type=int, default=16)
    p.add_argument(
        "--drain-every",
        type=int,
        default=8,
        help="wait for the shadow queue to run dry after this many requests (0: at window "
        "ends only); a server loaded back to back never runs its low-priority shadow",
    )
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "drift")
    return p


# ---------------------------------------------------------------- the stream


def noise_of(w: int, args: argparse.Namespace) -> float:
    return args.max_noise * w / max(args.windows - 1, 1)


def stream(ckpt: models.Checkpoint, args: argparse.Namespace) -> list[torch.Tensor]:
    """Each window's noisy uint8 images ``(n, C, H, W)``."""
    name = str(ckpt.provenance.get("dataset"))
    split, _ = data_mod.load_test_split(
        name, args.data_dir or data_mod.default_data_dir(), cache_dir=args.cache_dir
    )
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(split), generator=g)
    out = []
    for w in range(args.windows):
        idx = order[(w * args.window_size + torch.arange(args.window_size)) % len(split)]
        pixels = split.images[idx].float() / 255
        pixels = pixels + noise_of(w, args) * torch.randn(pixels.shape, generator=g)
        out.append((pixels.clamp(0, 1) * 255).round().to(torch.uint8))
    return out


def reference(ckpt: models.Checkpoint, pixels: torch.Tensor) -> models.CalibrationData:
    """Every exit's entropy and prediction of the full network; "correct" = agrees with
    the final exit (label-free)."""
    spec = ckpt.input_spec
    x = data_mod.normalize(pixels, torch.tensor(spec.mean), torch.tensor(spec.std))
    d = _calibration_on(ckpt.model, x, torch.zeros(len(x), dtype=torch.int64))
    assert d.prediction is not None
    return models.CalibrationData(d.entropy, d.prediction == d.prediction[:, -1:], d.prediction)


def png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    arr = pixels.numpy()
    img = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the server


class Server:
    """The served model under auto-tuning, through its HTTP API only."""

    def __init__(self, proc: ServerProcess, model: str, token: str) -> None:
        self.proc, self.model = proc, model
        self.client = httpx.Client(base_url=proc.url, timeout=60)
        self.admin = {"Authorization": f"Bearer {token}"}

    def classify(self, images: Sequence[bytes]) -> list[dict[str, Any]]:
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
        r = self.client.post(f"/v1/models/{self.model}/classify", files=files)
        r.raise_for_status()
        return list(r.json()["results"])

    def certify(self, epsilon: float, confidence: float) -> tuple[float, ...]:
        body = {"max_disagreement": epsilon, "confidence": confidence}
        r = self.client.put(f"/admin/models/{self.model}/thresholds", json=body, headers=self.admin)
        r.raise_for_status()
        return tuple(float(t) for t in r.json()["thresholds"])

    def autotune(self, enabled: bool | None = None) -> dict[str, Any]:
        path = f"/admin/models/{self.model}/autotune"
        if enabled is None:
            r = self.client.get(path, headers=self.admin)
        else:
            r = self.client.put(path, json={"enabled": enabled}, headers=self.admin)
        r.raise_for_status()
        return dict(r.json())

    def shadow(self) -> dict[str, float]:
        """This model's shadow series from ``/metrics`` (summed over other labels)."""
        text = self.client.get("/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("branchy_shadow") and s.labels.get("model") == self.model:
                    out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def drained(self, timeout: float = 300.0) -> dict[str, float]:
        """The shadow metrics once its queue has run dry (``branchy_shadow_queue_depth``)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.shadow()
            if now.get("branchy_shadow_queue_depth", 0.0) == 0 or time.monotonic() > deadline:
                return now
            time.sleep(0.02)


def serve(
    ckpt_dir: Path, name: str, tmp: Path, args: argparse.Namespace, token: str
) -> ServerProcess:
    """The server: ``ckpt_dir`` served as ``name``, shadow and auto-tuning as ``args``."""
    repo = tmp / "repo"
    repo.mkdir()
    (repo / name).symlink_to(ckpt_dir.resolve())
    env = {
        "BRANCHY_MODEL_REPOSITORY": str(repo),
        "BRANCHY_STATE_DIR": str(tmp / "state"),
        "BRANCHY_DEVICE": "cpu",
        "BRANCHY_TORCH_THREADS": "1",
        "BRANCHY_ADMIN_TOKEN": token,
        "BRANCHY_SHADOW_RATE": str(args.shadow_rate),
        "BRANCHY_SHADOW_QUEUE": str(4 * args.window_size),
        "BRANCHY_SHADOW_WINDOW": str(max(2 * args.window_size, args.min_samples)),
        "BRANCHY_SHADOW_BUDGET": str(args.epsilon),
        "BRANCHY_SHADOW_CONFIDENCE": str(args.confidence),
        "BRANCHY_AUTOTUNE_INTERVAL_S": str(args.interval),
        "BRANCHY_AUTOTUNE_MIN_SAMPLES": str(args.min_samples),
        "BRANCHY_AUTOTUNE_MAX_STEP": str(args.max_step),
        "BRANCHY_AUTOTUNE_HYSTERESIS": str(args.hysteresis),
        "BRANCHY_LOG_LEVEL": "INFO",
        "BRANCHY_STATE_POLL_S": "0",  # one server: nothing to poll for
    }
    proc = ServerProcess(env, log_path=tmp / "server.log", name="drift", strict=True)
    try:
        proc.wait_ready(180)
    except BaseException:
        proc.stop()
        raise
    return proc


def run_autotune(
    server: Server, windows: list[torch.Tensor], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Send the stream; per window the served exits and classes and the server's view."""
    out = []
    k = args.images_per_request
    for pixels in windows:
        encoded = [png(p) for p in pixels]
        results: list[dict[str, Any]] = []
        for n, i in enumerate(range(0, len(encoded), k), 1):
            results += server.classify(encoded[i : i + k])
            if args.drain_every and n % args.drain_every == 0:
                server.drained()  # a server with spare capacity for its shadow
        shadow = server.drained()
        state = server.autotune()
        out.append({"results": results, "shadow": shadow, "state": state})
    return out


# ---------------------------------------------------------------- offline policies


class Greedy:
    """The greedy tuner (offline): re-chooses after every ``min_samples`` sampled images.

    Args:
        start: thresholds in force at the start.
        macs: MACs of each exit.
        args: ε, shadow rate, min samples, cap per step.
        seed: seeds the sampling.
    """

    def __init__(
        self, start: tuple[float, ...], macs: list[int], args: argparse.Namespace, seed: int
    ) -> None:
        self.cur, self.macs, self.args = start, macs, args
        self.g = torch.Generator().manual_seed(seed)
        self.pending: list[models.CalibrationData] = []  # sampled since the last choice

    def window(self, data: models.CalibrationData) -> torch.Tensor:
        """The exit each image of the window takes; re-chooses as samples arrive."""
        a = self.args
        taken = torch.empty(data.num_samples, dtype=torch.int64)
        sampled = torch.rand(data.num_samples, generator=self.g) < a.shadow_rate
        have = sum(d.num_samples for d in self.pending)
        pos = 0
        while pos < data.num_samples:
            # the images until the sample is full run under the thresholds in force
            cum = torch.cumsum(sampled[pos:].long(), 0)
            full = (cum >= a.min_samples - have).nonzero()
            end = pos + int(full[0]) + 1 if len(full) else data.num_samples
            taken[pos:end] = exits_taken(data.entropy[pos:end], torch.tensor([self.cur]))[0]
            chunk = data.subset(torch.arange(pos, end)[sampled[pos:end]])
            self.pending.append(chunk)
            have += chunk.num_samples
            if have >= a.min_samples:
                self._choose()
                have = 0
            pos = end
        return taken

    def _choose(self) -> None:
        sample = models.CalibrationData(
            torch.cat([d.entropy for d in self.pending]),
            torch.cat([d.correct for d in self.pending]),
            torch.cat([d.prediction for d in self.pending if d.prediction is not None]),
        )
        point, _ = cheapest_within_risk(
            sample, self.macs, risk="disagreement", epsilon=self.args.epsilon
        )
        step = self.args.max_step  # the server's cap: upwards only
        self.cur = tuple(min(t, c + step) for t, c in zip(point.thresholds, self.cur, strict=True))
        self.pending = []


def served_figures(
    taken: torch.Tensor, classes: torch.Tensor, ref: models.CalibrationData, macs: list[int]
) -> tuple[float, float]:
    """True disagreement and compute saved of answers (exit taken, class) on ``ref``."""
    assert ref.prediction is not None
    final = ref.prediction[:, -1]
    cost = torch.tensor(macs, dtype=torch.float64)[taken].mean() / macs[-1]
    return float((classes != final).double().mean()), float(1 - cost)


# ---------------------------------------------------------------- the benchmark


def main(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = models.load_checkpoint(args.checkpoint)
    macs = ckpt.model.exit_macs()
    windows = stream(ckpt, args)
    refs = [reference(ckpt, p) for p in windows]
    token = secrets.token_hex(16)
    tmp = Path(tempfile.mkdtemp(prefix="drift-"))
    proc = serve(args.checkpoint, ckpt.model.name, tmp, args, token)
    try:
        server = Server(proc, ckpt.model.name, token)
        start = server.certify(args.epsilon, args.confidence)  # pins, so switch back on
        server.autotune(True)
        served = run_autotune(server, windows, args)
    finally:
        proc.stop()
        log = proc.log()
    tuner = Greedy(start, macs, args, seed=args.seed + 1)
    rows = []
    for w, (ref, srv) in enumerate(zip(refs, served, strict=True)):
        row: dict[str, Any] = {"window": w, "noise": noise_of(w, args)}
        assert ref.prediction is not None
        pred = ref.prediction
        fixed_taken = exits_taken(ref.entropy, torch.tensor([start]))[0]
        dis, saved = served_figures(
            fixed_taken, pred.gather(1, fixed_taken[:, None])[:, 0], ref, macs
        )
        row["fixed"] = {"thresholds": list(start), "true_disagreement": dis, "compute_saved": saved}
        g_taken = tuner.window(ref)
        dis, saved = served_figures(g_taken, pred.gather(1, g_taken[:, None])[:, 0], ref, macs)
        row["greedy"] = {
            "thresholds": list(tuner.cur),
            "true_disagreement": dis,
            "compute_saved": saved,
        }
        s_taken = torch.tensor([r["exit"]["index"] for r in srv["results"]])
        s_class = torch.tensor([r["class_index"] for r in srv["results"]])
        last = ref.num_exits - 1
        at_last = s_taken == last
        match = (
            float((s_class[at_last] == pred[at_last, -1]).double().mean()) if at_last.any() else 1.0
        )
        dis, saved = served_figures(s_taken, s_class, ref, macs)
        sh, st = srv["shadow"], srv["state"]
        row["autotune"] = {
            "thresholds": [float(t) for t in st["thresholds"]],
            "true_disagreement": dis,
            "compute_saved": saved,
            "final_exit_match": match,
            "shadow_estimate": sh.get("branchy_shadow_disagreement"),
            "shadow_upper": sh.get("branchy_shadow_disagreement_upper"),
            "shadow_window_samples": sh.get("branchy_shadow_window_samples"),
            "shadows_run": sh.get("branchy_shadow_total"),
            "shadows_dropped": sh.get("branchy_shadow_dropped_total"),
            "status": st["status"],
        }
        rows.append(row)
    limit = args.epsilon + 0.005
    summary = {
        name: {
            "violations": sum(r[name]["true_disagreement"] > limit for r in rows[1:]),
            "mean_compute_saved": sum(r[name]["compute_saved"] for r in rows) / len(rows),
        }
        for name in POLICIES
    }
    changes = [line for line in log.splitlines() if "(autotune:" in line]
    report = {
        "checkpoint": str(args.checkpoint),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu": cpu_name(),
        "command": " ".join(["python benchmarks/drift.py", *sys.argv[1:]]),
        "start_thresholds": list(start),
        "violation_limit": limit,
        "rows": rows,
        "summary": summary,
        "autotune_changes": changes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"drift-{ckpt.model.name}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(render(report))
    plot(report, args.out / f"{stem}.png")
    print(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    a = report["args"]
    lines = [
        f"# Drift: {report['checkpoint']} (ε = {100 * a['epsilon']:g} %, confidence "
        f"{a['confidence']}, shadow rate {a['shadow_rate']}, min samples {a['min_samples']})",
        "",
        f"`{report['command']}`; CPU {report['cpu']} (2 cores, shared with other jobs). "
        "`autotune` is a real server; `fixed` and `greedy` are computed offline on the same "
        "images. True disagreement (%) / compute saved (%) per window; a violation is a "
        f"window after the first above {100 * report['violation_limit']:.1f} %. Shadow: "
        "the server's windowed estimate and its upper bound (%) after the window, over "
        "the samples since its last change.",
        "",
        "| Window | Noise | fixed | autotune | greedy | shadow (bound) | autotune thresholds after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        cells = [
            f"{100 * r[p]['true_disagreement']:.2f} / {100 * r[p]['compute_saved']:.1f}"
            for p in POLICIES
        ]
        at = r["autotune"]
        est, up = at["shadow_estimate"], at["shadow_upper"]
        shadow = "-" if est is None else f"{100 * est:.2f} ({100 * up:.2f})"
        thresholds = ", ".join(f"{t:.3g}" for t in at["thresholds"])
        lines.append(
            f"| {r['window']} | {r['noise']:.2f} | "
            + " | ".join(cells)
            + f" | {shadow} | {thresholds} |"
        )
    lines += ["", "| Policy | Violations | Mean compute saved (%) |", "|---|---|---|"]
    for p, s in report["summary"].items():
        lines.append(f"| {p} | {s['violations']} | {100 * s['mean_compute_saved']:.1f} |")
    last = report["rows"][-1]["autotune"]
    lines += [
        "",
        f"Server: {len(report['autotune_changes'])} threshold changes by auto-tuning; "
        f"{last['shadows_run'] or 0:.0f} shadows of early exits run, "
        f"{last['shadows_dropped'] or 0:.0f} dropped; final-exit answers matching the "
        f"offline reference: min {min(100 * r['autotune']['final_exit_match'] for r in report['rows']):.2f} %.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    w = [r["window"] for r in report["rows"]]
    for p in POLICIES:
        a1.plot(w, [100 * r[p]["true_disagreement"] for r in report["rows"]], "o-", label=p)
        a2.plot(w, [100 * r[p]["compute_saved"] for r in report["rows"]], "o-", label=p)
    est = [r["autotune"]["shadow_estimate"] for r in report["rows"]]
    if all(e is not None for e in est):
        a1.plot(w, [100 * e for e in est], "x:", color="gray", label="shadow estimate")
    a1.axhline(100 * report["args"]["epsilon"], color="k", ls="--", lw=1, label="budget ε")
    a1.set(xlabel="window (noise grows)", ylabel="true disagreement (%)")
    a2.set(xlabel="window (noise grows)", ylabel="compute saved (%)")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
