"""The training CLI end to end on tiny synthetic MNIST: loss falls, checkpoints describe
themselves, resume continues exactly, thresholds are calibrated on validation data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from training import data as data_mod
from training import train

ROOT = Path(__file__).resolve().parents[2]


def run_main(argv: list[str]) -> Path | None:
    return train.main(train.parse_config(argv))


def base_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", "b-lenet", "--dataset", "mnist", "--data-dir", str(data_dir),
        "--val-size", "200", "--batch-size", "64", "--threads", "1", "--no-progress",
        "--out", str(out), "--work-dir", str(out.parent / (out.name + "-work")), *extra,
    ]  # fmt: skip


def test_a_few_steps_lower_the_joint_loss(mnist_dir: Path) -> None:
    torch.manual_seed(0)
    ds = data_mod.load_dataset("mnist", mnist_dir, val_size=200, seed=0)
    model = models.build_model("b-lenet")
    mean, std = torch.tensor(ds.mean), torch.tensor(ds.std)
    x = data_mod.normalize(ds.val.images, mean, std)

    def loss() -> float:
        with torch.no_grad():
            return float(train.joint_loss(model(x), ds.val.labels, [1.0, 1.0]))

    args = train.parse_config(
        [
            "--model",
            "b-lenet",
            "--dataset",
            "mnist",
            "--out",
            "unused",
            "--batch-size",
            "64",
            "--no-progress",
        ]
    )
    opt = train.build_optimizer(args, model)
    sched = train.build_scheduler(args, opt, steps_per_epoch=15)
    before = loss()
    train.train_one_epoch(
        model, opt, sched, ds.train, weights=[1.0, 1.0], mean=mean, std=std, cfg=args,
        epoch=0, info=train.DistInfo(), device=torch.device("cpu"),
    )  # fmt: skip
    after = loss()
    assert after < 0.7 * before, (before, after)


def test_train_writes_a_calibrated_self_describing_checkpoint(
    mnist_dir: Path, tmp_path: Path
) -> None:
    out = run_main(base_args(mnist_dir, tmp_path / "ck", "--epochs", "2", "--tolerance", "0.02"))
    assert out == tmp_path / "ck"
    ckpt = models.load_checkpoint(out)
    assert ckpt.model.name == "b-lenet" and ckpt.class_names == [str(i) for i in range(10)]
    ds = data_mod.load_dataset("mnist", mnist_dir, val_size=200, seed=0)
    assert ckpt.input_spec.mean == pytest.approx(ds.mean)
    assert ckpt.input_spec.std == pytest.approx(ds.std)
    # calibration data come from the validation split, and the thresholds are the
    # cheapest meeting the tolerance on it
    assert ckpt.calibration is not None and ckpt.calibration.num_samples == 200
    expected = models.choose_thresholds(ckpt.calibration, ckpt.model.exit_macs(), tolerance=0.02)
    assert ckpt.thresholds == pytest.approx(list(expected.thresholds))
    history = ckpt.metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["loss"] < history[0]["loss"]
    assert min(ckpt.metrics["val_exit_accuracy"]) > 0.5  # the synthetic task is easy
    prov = ckpt.provenance
    assert prov["dataset"] == "mnist" and len(prov["data_sha256"]) == 64
    assert "training.train" in prov["command"] and prov["versions"]["torch"]
    args = json.loads((out / "args.json").read_text())
    assert args["epochs"] == 2 and args["model"] == "b-lenet" and args["augment"] is False


def test_resume_continues_exactly(mnist_dir: Path, tmp_path: Path) -> None:
    straight = run_main(base_args(mnist_dir, tmp_path / "a", "--epochs", "2"))
    run_main(base_args(mnist_dir, tmp_path / "b", "--epochs", "1"))
    resumed = run_main(base_args(mnist_dir, tmp_path / "b", "--epochs", "2", "--resume"))
    assert straight is not None and resumed is not None
    a = models.load_checkpoint(straight).model.state_dict()
    b = models.load_checkpoint(resumed).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    ck = models.load_checkpoint(resumed)
    assert [h["epoch"] for h in ck.metrics["history"]] == [1, 2]


def test_two_phase_schedule_leaves_the_branch_untrained_first(
    mnist_dir: Path, tmp_path: Path
) -> None:
    out = run_main(base_args(mnist_dir, tmp_path / "p", "--epochs", "1", "--main-epochs", "1"))
    assert out is not None
    torch.manual_seed(0)  # main() seeds before building, so this is the initial state
    fresh = models.build_model("b-lenet")
    trained = models.load_checkpoint(out).model
    # the branch head got no gradient; Adam leaves parameters without gradients alone
    for (name, p), (_, q) in zip(
        fresh.heads[0].named_parameters(), trained.heads[0].named_parameters(), strict=True
    ):
        assert torch.equal(p, q), name
    assert not torch.equal(fresh.heads[1][0].weight, trained.heads[1][0].weight)


def test_target_accuracy_mode(mnist_dir: Path, tmp_path: Path) -> None:
    out = run_main(
        base_args(mnist_dir, tmp_path / "t", "--epochs", "1", "--target-accuracy", "0.3")
    )
    ckpt = models.load_checkpoint(out)
    assert ckpt.calibration is not None
    point = models.evaluate_thresholds(ckpt.calibration, ckpt.model.exit_macs(), ckpt.thresholds)
    assert point.accuracy >= 0.3
    assert ckpt.metrics["calibration_rule"]["target_accuracy"] == 0.3


def test_cli_reports_missing_data_clearly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--model", "lenet", "--dataset", "mnist",
         "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in proc.stderr and str(tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exit-weights", "1,1,1"], "exit-weights needs 2"),
        (["--main-epochs", "5"], "main-epochs"),
        (["--b1-extra-convs", "2"], "b-alexnet only"),
    ],
)
def test_bad_argument_combinations(
    mnist_dir: Path, tmp_path: Path, extra: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        run_main(base_args(mnist_dir, tmp_path / "x", "--epochs", "1", *extra))


def test_calibration_picks_the_cheapest_thresholds_meeting_the_constraint() -> None:
    # Hand-made 2-exit case. Exit 0 costs 1, exit 1 costs 4 (cumulative). The final exit
    # is right on all 10 samples. Exit 0 is right on samples 0..6, whose entropies are
    # the lowest (0.1..0.7), and wrong on 7..9 (0.8..1.0).
    entropy = torch.tensor([[0.1 * (i + 1), 0.05] for i in range(10)])
    correct = torch.tensor([[i < 7, True] for i in range(10)])
    calib = models.CalibrationData(entropy, correct)
    macs = [1, 4]
    # tolerance 0: nobody wrong may leave early -> the 7 right ones leave: T in (0.7, 0.8]
    p = models.choose_thresholds(calib, macs, tolerance=0.0)
    assert 0.7 < p.thresholds[0] <= 0.8
    assert p.accuracy == 1.0 and p.exit_shares == pytest.approx((0.7, 0.3))
    # tolerance 0.1: one wrong early answer is allowed -> 8 leave
    p = models.choose_thresholds(calib, macs, tolerance=0.1)
    assert 0.8 < p.thresholds[0] <= 0.9 and p.accuracy == pytest.approx(0.9)
    # brute force: no threshold on a fine grid is cheaper and still feasible
    for t in torch.linspace(0, 1.2, 241).tolist():
        q = models.evaluate_thresholds(calib, macs, [t])
        if q.accuracy >= 0.9 - 1e-12:
            assert q.expected_macs >= p.expected_macs
    # absolute target below what exit 0 alone gives when everyone leaves
    p = models.choose_thresholds(calib, macs, target=0.7)
    assert p.exit_shares[0] == 1.0 and p.expected_macs == 1.0


def test_torchrun_ddp_on_cpu(mnist_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks under torchrun: each trains its shard, rank 0 writes the checkpoint."""
    out = tmp_path / "ddp"
    argv = base_args(mnist_dir, out, "--epochs", "1", "--device", "cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "training.train", *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = models.load_checkpoint(out)
    history = ckpt.metrics["history"]
    assert len(history) == 1 and ckpt.calibration is not None
    # 1000 training images, 2 ranks, batch 64: 7 full batches per rank, not 15
    assert "7 steps/epoch" in proc.stderr


def test_stop_then_resume_matches_an_uninterrupted_cosine_run(
    mnist_dir: Path, tmp_path: Path
) -> None:
    sched = ["--schedule", "cosine", "--epochs", "2"]
    straight = run_main(base_args(mnist_dir, tmp_path / "a", *sched))
    stopped = run_main(base_args(mnist_dir, tmp_path / "b", *sched, "--stop-after-epoch", "1"))
    assert stopped is None and not (tmp_path / "b").exists()
    resumed = run_main(base_args(mnist_dir, tmp_path / "b", *sched, "--resume"))
    assert straight is not None and resumed is not None
    a = models.load_checkpoint(straight).model.state_dict()
    b = models.load_checkpoint(resumed).model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_time_budget_shortens_the_run_and_re_spans_the_schedule() -> None:
    args = train.parse_config(
        ["--model", "b-lenet", "--dataset", "mnist", "--out", "unused", "--epochs", "10",
         "--schedule", "cosine", "--time-budget", "100"]
    )  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    factor = train.build_scheduler(args, opt, steps_per_epoch=4).lr_lambdas[0]
    assert factor(20) == pytest.approx(0.5)  # half-way through 10 epochs of 4 steps
    # 2 epochs took 40 s, so 3 more fit in the remaining 60 s: 5 in all
    train.fit_time_budget(args, 2, 2, 40.0, train.DistInfo(), torch.device("cpu"))
    assert args.epochs == 5
    assert factor(20) == pytest.approx(0.0)  # the cosine now ends at step 20
    train.fit_time_budget(args, 3, 3, 30.0, train.DistInfo(), torch.device("cpu"))
    assert args.epochs == 5  # never lengthened
    train.fit_time_budget(args, 4, 4, 400.0, train.DistInfo(), torch.device("cpu"))
    assert args.epochs == 4  # over budget: stop after the epochs already run


def test_time_budget_ends_training_with_a_checkpoint(mnist_dir: Path, tmp_path: Path) -> None:
    out = run_main(base_args(mnist_dir, tmp_path / "ck", "--epochs", "5", "--time-budget", "0"))
    assert out is not None
    ckpt = models.load_checkpoint(out)
    assert [h["epoch"] for h in ckpt.metrics["history"]] == [1]
    assert json.loads((out / "args.json").read_text())["epochs"] == 1


def test_amp_is_off_on_cpu_unless_asked_and_trains_in_bfloat16_when_asked(
    mnist_dir: Path, tmp_path: Path
) -> None:
    plain = run_main(base_args(mnist_dir, tmp_path / "plain", "--epochs", "1"))
    assert plain is not None and json.loads((plain / "args.json").read_text())["amp"] is False
    amp = run_main(base_args(mnist_dir, tmp_path / "amp", "--epochs", "2", "--amp"))
    assert amp is not None and json.loads((amp / "args.json").read_text())["amp"] is True
    history = models.load_checkpoint(amp).metrics["history"]
    assert history[1]["loss"] < history[0]["loss"]
    assert min(models.load_checkpoint(amp).metrics["val_exit_accuracy"]) > 0.5


def test_a_diverging_run_stops_with_a_clear_error(mnist_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="diverged in epoch 1"):
        run_main(base_args(mnist_dir, tmp_path / "ck", "--epochs", "2", "--lr", "1e30"))
    assert not (tmp_path / "ck").exists()  # no checkpoint of a broken model


def _grad_norm_after_one_step(*extra: str) -> float:
    args = train.parse_config(
        ["--model", "b-lenet", "--dataset", "mnist", "--out", "unused", "--batch-size", "8",
         "--no-progress", *extra]
    )  # fmt: skip
    torch.manual_seed(0)
    model = models.build_model("b-lenet")
    split = data_mod.Split(
        torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (8,))
    )
    opt = train.build_optimizer(args, model)
    sched = train.build_scheduler(args, opt, steps_per_epoch=1)
    train.train_one_epoch(
        model, opt, sched, split, weights=[1.0, 1.0], mean=torch.zeros(1), std=torch.ones(1),
        cfg=args, epoch=0, info=train.DistInfo(), device=torch.device("cpu"),
    )  # fmt: skip
    # the step's gradients are still there (they are dropped at the next step)
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.cat(grads).norm())


def test_clip_grad_norm_bounds_the_step() -> None:
    assert _grad_norm_after_one_step() > 0.8  # the same step unclipped
    assert _grad_norm_after_one_step("--clip-grad-norm", "0.5") == pytest.approx(0.5, rel=1e-4)
