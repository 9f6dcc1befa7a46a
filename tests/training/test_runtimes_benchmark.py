"""``benchmarks/runtimes.py`` end to end on tiny synthetic checkpoints and data: every
runtime and ``auto`` timed for both nets, and every ratio, share and gain in its JSON
follows its definition from the times recorded next to it (no timing is judged)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

import models
from models.runtimes import openvino_has_bf16
from testsupport.checkpoints import sharpen_heads

ROOT = Path(__file__).resolve().parents[2]

spec = importlib.util.spec_from_file_location("runtimes_bench", ROOT / "benchmarks" / "runtimes.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
sys.modules["runtimes_bench"] = bench
spec.loader.exec_module(bench)

ROUNDS = 2


def zoo(tmp_path: Path) -> Path:
    """Untrained B-LeNet (heads sharpened, so samples leave at both exits) and LeNet."""
    root = tmp_path / "zoo"
    spec = models.InputSpec(1, 28, 28, (0.13,), (0.31,))
    for name, thresholds in (("b-lenet", [0.4]), ("lenet", None)):
        torch.manual_seed(0)
        net = sharpen_heads(models.build_model(name)).eval()
        models.save_checkpoint(
            root / name, net, class_names=[str(i) for i in range(10)], input_spec=spec,
            thresholds=thresholds, provenance={"dataset": "mnist"},
        )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def result(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "runtimes.json"
    returned = bench.main(
        ["--zoo", str(zoo(tmp)), "--pairs", "b-lenet:lenet", "--data-dir", str(mnist_dir),
         "--cache-dir", str(tmp / "cache"), "--rounds", str(ROUNDS), "--latency-samples", "20",
         "--throughput-samples", "64", "--profile-samples", "32", "--batch-size", "16",
         "--note", "synthetic", "--out", str(out), "--md", str(tmp / "runtimes.md")]
    )  # fmt: skip
    return json.loads(out.read_text()), returned, (tmp / "runtimes.md").read_text()


def rows_of(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["engine"]): r for r in report["pairs"][0]["rows"]}


def test_machine_versions_and_engines_are_named(result: tuple[dict, dict, str]) -> None:
    report, returned, md = result
    assert report == json.loads(json.dumps(returned))
    assert report["cpu"]["model"] and set(report["cpu"]["flags"]) >= {"avx2", "avx512f", "amx_bf16"}
    assert all(report["versions"][k] for k in ("torch", "onnxruntime", "openvino"))
    assert report["threads"] == 1 and report["rounds"] == ROUNDS
    engines = ["torch fp32", "onnxruntime fp32", "openvino fp32"]
    engines += ["openvino bf16"] if openvino_has_bf16() else []
    assert set(rows_of(report)) == {
        (k, e) for k in ("plain", "branchy") for e in [*engines, "auto"]
    }
    assert report["cpu"]["model"] in md and "synthetic" in md
    assert "| Net | Engine | batch-1 ms |" in md and "| Runtime | plain µs |" in md


def test_samples_are_class_balanced_and_agreement_counts_add_up(
    result: tuple[dict, dict, str],
) -> None:
    report, _, _ = result
    pair = report["pairs"][0]
    assert pair["samples"] == {"latency": 20, "throughput": 64, "profile": 32}
    assert pair["latency_class_counts"] == [2] * 10
    for (kind, engine), r in rows_of(report).items():
        assert len(r["latency_ms"]["per_round_median"]) == ROUNDS
        assert r["latency_ms"]["samples_per_round"] == 20
        assert len(r["throughput_img_s"]["per_round"]) == ROUNDS
        for where, n in (("batch", 64), ("batch1", 20)):
            a = r["agreement_with_torch"][where]
            assert a["total"] == n and 0 <= a["same"] <= n and a["share"] == a["same"] / n
            if r["precision"] == "fp32":
                assert a["same"] == n, (kind, engine, where)  # fp32 equals torch here
        assert sum(r["exit_shares"]) == pytest.approx(1.0)
        assert len(r["exit_shares"]) == (2 if kind == "branchy" else 1)
    # the sharpened heads and threshold send some samples out at each exit
    assert 0 < rows_of(report)[("branchy", "torch fp32")]["exit_shares"][0] < 1


def test_ratios_follow_from_the_recorded_times(result: tuple[dict, dict, str]) -> None:
    report, _, _ = result
    pair = report["pairs"][0]
    rows = rows_of(report)
    lat = {k: r["latency_ms"]["per_round_median"] for k, r in rows.items()}
    rate = {k: r["throughput_img_s"]["per_round"] for k, r in rows.items()}
    plains = [k for k in rows if k[0] == "plain" and k[1] != "auto"]
    fastest_lat = min(plains, key=lambda k: statistics.median(lat[k]))
    fastest_tput = max(plains, key=lambda k: statistics.median(rate[k]))
    assert pair["fastest_plain"] == {"latency": fastest_lat[1], "throughput": fastest_tput[1]}
    eager_plain, eager_branchy = ("plain", "torch fp32"), ("branchy", "torch fp32")
    for k, r in rows.items():
        assert r["latency_ms"]["median"] == pytest.approx(statistics.median(lat[k]))
        assert r["throughput_img_s"]["median"] == pytest.approx(statistics.median(rate[k]))
        refs = {"eager_plain": eager_plain}
        if k[0] == "branchy":
            refs["eager_branchy"] = eager_branchy
        for name, ref in refs.items():
            expect_lat = [a / b for a, b in zip(lat[ref], lat[k], strict=True)]
            expect_tput = [b / a for a, b in zip(rate[ref], rate[k], strict=True)]
            got = r["ratios"][f"latency_vs_{name}"]
            assert got["per_round"] == pytest.approx(expect_lat)
            assert got["median"] == pytest.approx(statistics.median(expect_lat))
            assert r["ratios"][f"throughput_vs_{name}"]["per_round"] == pytest.approx(expect_tput)
        fl = [a / b for a, b in zip(lat[fastest_lat], lat[k], strict=True)]
        ft = [b / a for a, b in zip(rate[fastest_tput], rate[k], strict=True)]
        assert r["ratios"]["latency_vs_fastest_plain"]["median"] == pytest.approx(
            statistics.median(fl)
        )
        assert r["ratios"]["throughput_vs_fastest_plain"]["median"] == pytest.approx(
            statistics.median(ft)
        )
    assert rows[eager_plain]["ratios"]["latency_vs_eager_plain"]["per_round"] == [1.0] * ROUNDS
    # the goals read the auto branchy row's ratios
    auto = rows[("branchy", "auto")]["ratios"]
    goals = {g["goal"]: g for g in pair["goals"]}
    assert len(goals) == 3 and all(
        g["met"] == (g["measured"] >= g["target"]) for g in goals.values()
    )
    for g in goals.values():
        assert g["measured"] == pytest.approx(statistics.median(g["per_round"]))
    per_round = sorted(g["per_round"] for g in goals.values())
    assert per_round == sorted([
        auto["latency_vs_fastest_plain"]["per_round"],
        auto["throughput_vs_fastest_plain"]["per_round"],
        auto["latency_vs_eager_branchy"]["per_round"],
    ])  # fmt: skip


def test_profile_charges_each_sample_the_segments_it_ran(result: tuple[dict, dict, str]) -> None:
    report, _, _ = result
    pair = report["pairs"][0]
    rows = rows_of(report)
    assert set(pair["profile"]) == {e for k, e in rows if k == "branchy" and e != "auto"}
    for engine, f in pair["profile"].items():
        branchy, plain = rows[("branchy", engine)], rows[("plain", engine)]
        assert f["exit_shares"] == branchy["exit_shares"]
        s0, s1 = f["exit_shares"]
        per_round = f["per_round"]
        segs = branchy["segment_us_per_image_per_round"]
        plains = plain["segment_us_per_image_per_round"]
        b_rates = branchy["throughput_img_s"]["per_round"]
        p_rates = plain["throughput_img_s"]["per_round"]
        assert len(segs) == len(plains) == ROUNDS
        assert per_round["branchy_segment_us_per_image"] == segs
        for r, (seg, (p_us,), b, p) in enumerate(zip(segs, plains, b_rates, p_rates, strict=True)):
            assert len(seg) == 2 and min(seg) > 0
            ideal = s0 * seg[0] + s1 * (seg[0] + seg[1])  # exit 1 pays both segments
            assert per_round["plain_us_per_image"][r] == pytest.approx(p_us)
            assert per_round["ideal_us_per_image"][r] == pytest.approx(ideal)
            assert per_round["time_ideal_gain"][r] == pytest.approx(p_us / ideal)
            assert per_round["first_segment_share_of_plain"][r] == pytest.approx(seg[0] / p_us)
            assert per_round["gain_if_all_leave_at_first_exit"][r] == pytest.approx(p_us / seg[0])
            assert per_round["measured_throughput_gain"][r] == pytest.approx(b / p)
            assert per_round["measured_vs_time_ideal"][r] == pytest.approx(b / p / (p_us / ideal))
        for key, values in per_round.items():
            if key != "branchy_segment_us_per_image":
                assert f[key] == pytest.approx(statistics.median(values)), key
        medians = [statistics.median(t) for t in zip(*segs, strict=True)]
        assert f["branchy_segment_us_per_image"] == pytest.approx(medians)
        assert branchy["segment_us_per_image"] == pytest.approx(medians)


def test_ideal_time_definition() -> None:
    assert bench.ideal_seconds_per_image([1.0, 2.0, 4.0], [0.5, 0.25, 0.25]) == pytest.approx(
        0.5 * 1 + 0.25 * 3 + 0.25 * 7
    )
    with pytest.raises(ValueError):
        bench.ideal_seconds_per_image([1.0], [0.5, 0.5])
    assert bench.rotated(3, 0) == [0, 1, 2] and bench.rotated(3, 1) == [1, 2, 0]


def test_cpu_model_and_flags_come_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    cpu = bench.cpu_info(info)
    assert cpu["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    on = {f for f, v in cpu["flags"].items() if v}
    assert on == {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert bench.cpu_info(tmp_path / "missing")["flags"]["avx2"] is False


def test_render_rewrites_the_same_markdown_from_the_json(
    result: tuple[dict, dict, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, _, md = result
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(report))
    bench.main(["--render", str(saved), "--md", str(tmp_path / "again.md")])
    assert (tmp_path / "again.md").read_text() == md
    assert capsys.readouterr().out == md
