"""``run_module``, the engine's low-overhead way of running stages and heads, gives exactly
what calling the module gives, and steps aside for hooks, subclasses and odd layers."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import models
from models import inference
from models.inference import global_hooks_active, max_pool_split, run_module, run_owned
from testsupport.checkpoints import sharpen_heads


@pytest.mark.parametrize("name", ["lenet", "b-lenet", "alexnet", "b-alexnet", "b-resnet20"])
@pytest.mark.parametrize("batch", [1, 5, 16])
def test_every_stage_and_head_matches_the_module_call_bit_for_bit(name: str, batch: int) -> None:
    torch.manual_seed(0)
    net = models.build_model(name).eval()
    h = torch.randn(batch, *net.input_shape)
    with torch.no_grad():
        for stage, head in zip(net.stages, net.heads, strict=True):
            fast, slow = run_module(stage, h), stage(h)
            assert torch.equal(fast, slow)
            assert torch.equal(run_module(head, fast), head(slow))
            h = slow


def test_layers_it_does_not_shortcut_run_as_modules() -> None:
    class Doubling(nn.ReLU):  # a subclass may override forward: never bypassed
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * x

    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        Doubling(),
        nn.Dropout(0.5),
        nn.Flatten(),
    )
    x = torch.randn(4, 2, 5, 5)
    with torch.no_grad():
        net.eval()
        assert torch.equal(run_module(net, x), net(x))
        assert (run_module(net, -x.abs() - 1) < 0).any()  # Doubling's forward ran, not relu
        net.train()  # training-mode dropout zeroes about half
        torch.manual_seed(1)
        out = run_module(net, x.abs() + 1)
        assert (out == 0).float().mean() > 0.3


def test_hooks_and_replaced_layers_take_effect_at_once() -> None:
    torch.manual_seed(0)
    net = models.build_model("b-lenet").eval()
    x = torch.randn(3, *net.input_shape)
    before = net.early_exit(x, [math.inf])
    calls = []
    pool = net.heads[0][0]
    handle = pool.register_forward_hook(lambda m, i, o: calls.append(o.shape) or o + 100.0)
    try:
        hooked = net.early_exit(x, [math.inf])
        assert calls == [torch.Size([3, 5, 15, 15])]
        assert not torch.equal(hooked.logits, before.logits)  # the hook's output was used
    finally:
        handle.remove()
    assert torch.equal(net.early_exit(x, [math.inf]).logits, before.logits)
    net.heads[0][-1] = nn.Linear(640, 10)  # a new classifier: used on the next call
    with torch.no_grad():
        expected = net(x)[0]
    assert torch.equal(net.early_exit(x, [math.inf]).logits, expected)


def test_global_hooks_send_every_layer_through_module_call() -> None:
    torch.manual_seed(0)
    net = sharpen_heads(models.build_model("b-lenet")).eval()
    x = torch.randn(2, *net.input_shape)
    seen: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        assert global_hooks_active()
        got = net.early_exit(x, [0.0])  # nobody leaves early: both stages run
    finally:
        handle.remove()
    assert not global_hooks_active()
    assert seen.count("Conv2d") == 4 and seen.count("MaxPool2d") == 5
    assert torch.equal(got.logits, net.early_exit(x, [0.0]).logits)


def test_early_exit_leaves_autograd_as_it_found_it() -> None:
    net = models.build_model("b-lenet").eval()
    x = torch.randn(2, *net.input_shape, requires_grad=True)
    got = net.early_exit(x, [1.0])
    assert not got.logits.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        assert torch.equal(net.early_exit(x, [1.0]).logits, got.logits)
        assert not torch.is_grad_enabled()


# values from a small set, so that windows hold ties, +0.0 next to -0.0, ±inf and NaN
VOCAB = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 2.5])


@pytest.mark.parametrize("ceil_mode", [True, False])
@pytest.mark.parametrize(("kernel", "stride"), [(2, 2), (3, 2), (3, 3), (3, 1), (2, 3)])
def test_split_max_pool_gives_the_2d_kernels_bits(
    kernel: int, stride: int, ceil_mode: bool
) -> None:
    gen = torch.Generator().manual_seed(kernel * 10 + stride)
    for _ in range(100):
        n, c, h, w = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in
                      ((1, 4), (1, 4), (kernel, 14), (kernel, 14)))  # fmt: skip
        x = VOCAB[torch.randint(0, len(VOCAB), (n, c, h, w), generator=gen)]
        expected = torch.max_pool2d(x, kernel, stride, 0, 1, ceil_mode)
        got = max_pool_split(x, kernel, stride, ceil_mode=ceil_mode)
        assert got.shape == expected.shape and got.is_contiguous()
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (n, c, h, w)


def test_large_cpu_batches_take_the_split_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(x: torch.Tensor, kernel: int, stride: int, *, ceil_mode: bool) -> torch.Tensor:
        calls.append((tuple(x.shape), kernel, stride))
        return max_pool_split(x, kernel, stride, ceil_mode=ceil_mode)

    monkeypatch.setattr(inference, "max_pool_split", counting)
    pool = nn.MaxPool2d(2, ceil_mode=True)
    with torch.no_grad():
        run_module(pool, torch.randn(1, 10, 15, 15))  # small: the 2-D kernel
        run_module(pool, torch.randn(1, 5, 30, 30))  # B-LeNet's first, one image: 2-D too
        assert calls == []
        run_module(pool, torch.randn(64, 5, 30, 30))
        assert calls == [((64, 5, 30, 30), 2, 2)]
        run_module(nn.MaxPool2d(3, 2, ceil_mode=True), torch.randn(64, 5, 30, 30))
        assert calls[-1] == ((64, 5, 30, 30), 3, 2)
        run_module(nn.MaxPool2d((3, 2), 2), torch.randn(64, 5, 30, 30))  # not square
        run_module(nn.MaxPool2d(2, 2, padding=1), torch.randn(64, 5, 30, 30))
        assert len(calls) == 2
    x = torch.randn(64, 5, 30, 30, requires_grad=True)
    run_module(pool, x).sum().backward()  # autograd on: the 2-D kernel and its backward
    assert len(calls) == 2 and x.grad is not None


@pytest.mark.parametrize("size", [3, 5, 4, 2, 1])
def test_local_response_norm_gives_pytorchs_bits(size: int) -> None:
    torch.manual_seed(size)
    lrn = nn.LocalResponseNorm(size, alpha=1.5e-4, beta=0.75, k=2.0)
    x = torch.randn(6, 7, 5, 4) * 30
    x[0, 0, 0, :] = torch.tensor([0.0, -0.0, 1e30, -1e-30])
    with torch.no_grad():
        for h in (x, x[:, :1], x.transpose(2, 3)):  # one channel; not contiguous
            assert torch.equal(run_module(lrn, h).reshape(-1), lrn(h).reshape(-1))
        assert torch.equal(run_module(lrn, x[0]), lrn(x[0]))  # 3-D: PyTorch's own path
        for _ in range(60):  # shapes and scales at random, compared as bit patterns
            shape = [int(v) for v in torch.randint(1, 10, (4,))]
            h = torch.randn(shape) * float(torch.rand(()) * 100)
            got, expected = run_module(lrn, h), lrn(h)
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), shape


def _net_starting_on_its_input() -> nn.Sequential:
    # layers that may return their input or a view of it come first: the ReLU after them
    # would write into the caller's tensor if the walk lost track
    return nn.Sequential(nn.Dropout(), nn.Flatten(), nn.ReLU(), nn.Linear(12, 3), nn.ReLU())


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet", "b-resnet20"])
def test_the_callers_tensors_are_never_overwritten(name: str) -> None:
    torch.manual_seed(0)
    net = sharpen_heads(models.build_model(name)).eval()
    x = torch.randn(24, *net.input_shape)
    kept = x.clone()
    with torch.no_grad():
        h = net.stages[0](x)
        h_kept = h.clone()
        run_module(net.heads[0], h)  # a head reads the stage output the next stage needs
        run_module(net.stages[1], h)
        assert torch.equal(h, h_kept)
        net.early_exit(x, [0.0] * (net.num_exits - 1))
        net.early_exit(x[:1], [0.0] * (net.num_exits - 1))
        seq, y = _net_starting_on_its_input().eval(), -torch.rand(2, 3, 4)
        y_kept = y.clone()
        out, owned = run_owned(seq, y)
        assert torch.equal(y, y_kept) and owned  # the last ReLU wrote into the Linear's output
        assert torch.equal(out, seq(y))
    assert torch.equal(x, kept)


def test_owned_inputs_are_overwritten_only_when_said() -> None:
    relu = nn.Sequential(nn.ReLU())
    x = -torch.rand(3, 4)
    with torch.no_grad():
        run_module(relu, x)
        assert (x < 0).all()
        run_module(relu, x, owned=True)
        assert (x == 0).all()


def test_shared_prefixes_of_the_zoo_architectures() -> None:
    # B-AlexNet: ReLU, pool and LRN open both the first branch and the trunk's next
    # stage; ReLU opens the second branch and the last stage. B-LeNet: pool and ReLU.
    assert models.build_model("b-alexnet").shared_prefixes() == [3, 1, 0]
    assert models.build_model("b-lenet").shared_prefixes() == [2, 0]
    assert models.build_model("b-resnet20").shared_prefixes() == [0, 0, 0]
    assert models.build_model("alexnet").shared_prefixes() == [0]


def test_only_identical_parameter_free_layers_are_shared() -> None:
    net = models.build_model("b-alexnet")
    net.heads[0][1] = nn.MaxPool2d(3, stride=2, ceil_mode=False)  # other settings
    assert net.shared_prefixes()[0] == 1
    net = models.build_model("b-alexnet")
    handle = net.stages[1][2].register_forward_hook(lambda m, i, o: o)
    assert net.shared_prefixes()[0] == 2  # a hooked layer must run where it is
    handle.remove()
    assert inference.shared_prefix(nn.Sequential(nn.ReLU()), nn.ReLU()) == 0
    returning = nn.Sequential(nn.MaxPool2d(2, return_indices=True))
    assert inference.shared_prefix(returning, returning) == 0


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet", "alexnet", "b-resnet20"])
def test_engine_gives_the_module_calls_bits(name: str) -> None:
    # With a global hook registered the engine calls every layer as a module (PyTorch's
    # own max-pooling, LRN and out-of-place ReLU, no shared prefixes); without, its own
    # walk. Same logits, entropies and exits to the bit, at sizes that take the split
    # pooling, with thresholds that send samples to every exit.
    torch.manual_seed(1)
    net = sharpen_heads(models.build_model(name)).eval()
    x = torch.randn(24, *net.input_shape)
    t = [1.0] * (net.num_exits - 1)
    with torch.no_grad():
        outs = net(x)
    for i, z in enumerate(outs[:-1]):  # about half of those left leave at each exit
        t[i] = float(models.entropy_from_logits(z).median())
    fast = net.early_exit(x, t)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        slow = net.early_exit(x, t)
    finally:
        handle.remove()
    assert torch.equal(fast.exit_index, slow.exit_index)
    assert torch.equal(fast.logits, slow.logits) and torch.equal(fast.entropy, slow.entropy)
    if net.num_exits > 1:
        assert len(set(fast.exit_index.tolist())) >= 2


def _eager_parts():  # type: ignore[no-untyped-def]
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "eager_parts.py"
    spec = importlib.util.spec_from_file_location("eager_parts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eager_parts"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["b-lenet", "b-alexnet"])
def test_the_benchmarks_ablations_give_the_engines_bits(name: str) -> None:
    # benchmarks/eager_parts.py times the engine with each part switched off; every
    # variant must compute the same answer, or its timing compares different work
    bench = _eager_parts()
    torch.manual_seed(2)
    net = sharpen_heads(models.build_model(name)).eval()
    variants = bench.variants(net)
    assert ("-lrn" in variants) == (name == "b-alexnet") and "plain" in variants
    x = torch.randn(16, *net.input_shape)
    with torch.no_grad():
        outs = net(x)
    t = [float(models.entropy_from_logits(z).median()) for z in outs[:-1]]
    for label, parts in variants.items():
        ex = bench.Ablated(net, parts)
        for inp in (x, x[:1], x[5:6]):
            with bench.no_thresholds_for_one(parts):
                got = models.engine.early_exit(ex, inp, t)
            want = net.early_exit(inp, t)
            assert torch.equal(got.exit_index, want.exit_index), label
            assert torch.equal(got.logits, want.logits), label
            assert torch.equal(got.entropy, want.entropy), label
