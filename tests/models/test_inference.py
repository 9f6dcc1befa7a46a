"""``run_module``, the engine's low-overhead way of running stages and heads, gives exactly
what calling the module gives, and steps aside for hooks, subclasses and odd layers."""

import math

import pytest
import torch
from torch import nn

import models
from models import inference
from models.inference import global_hooks_active, max_pool_2x2, run_module
from tests.helpers import sharpen_heads


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


@pytest.mark.parametrize("ceil_mode", [True, False])
def test_split_max_pool_gives_the_2d_kernels_bits(ceil_mode: bool) -> None:
    # values from a small set, so that windows hold ties, +0.0 next to -0.0, ±inf and NaN
    vocab = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 2.5])
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n, c, h, w = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in
                      ((1, 4), (1, 4), (2, 13), (2, 13)))  # fmt: skip
        x = vocab[torch.randint(0, len(vocab), (n, c, h, w), generator=gen)]
        expected = torch.max_pool2d(x, 2, 2, 0, 1, ceil_mode)
        got = max_pool_2x2(x, ceil_mode=ceil_mode)
        assert got.shape == expected.shape and got.is_contiguous()
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (n, c, h, w)


def test_large_cpu_batches_take_the_split_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting(x: torch.Tensor, *, ceil_mode: bool) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return max_pool_2x2(x, ceil_mode=ceil_mode)

    monkeypatch.setattr(inference, "max_pool_2x2", counting)
    pool = nn.MaxPool2d(2, ceil_mode=True)
    with torch.no_grad():
        run_module(pool, torch.randn(1, 5, 30, 30))  # small: the 2-D kernel
        assert calls == []
        run_module(pool, torch.randn(64, 5, 30, 30))
        assert calls == [(64, 5, 30, 30)]
        run_module(nn.MaxPool2d(3, 2, ceil_mode=True), torch.randn(64, 5, 30, 30))
        assert len(calls) == 1  # only 2x2 windows with stride 2
    x = torch.randn(64, 5, 30, 30, requires_grad=True)
    run_module(pool, x).sum().backward()  # autograd on: the 2-D kernel and its backward
    assert len(calls) == 1 and x.grad is not None
