import math

import pytest
import torch

from models import entropy_from_logits
from models.exits import entropy_of_one


def test_matches_definition_on_ordinary_logits() -> None:
    z = torch.randn(100, 10) * 3
    p = torch.softmax(z.double(), dim=1)
    expected = -(p * p.log()).sum(1)
    torch.testing.assert_close(entropy_from_logits(z).double(), expected, atol=1e-5, rtol=1e-5)


def test_uniform_is_ln_c_and_one_hot_is_zero() -> None:
    assert entropy_from_logits(torch.zeros(1, 10)).item() == pytest.approx(math.log(10), abs=1e-6)
    assert entropy_from_logits(torch.tensor([[1e4, 0.0, 0.0]])).item() == 0.0


@pytest.mark.parametrize(
    "row",
    [
        [1e30, -1e30, 0.0],
        [-1e30, -1e30, -1e30],
        [math.inf, 0.0, 0.0],
        [math.inf, math.inf, 0.0],
        [-math.inf, 0.0, 1.0],
        [math.nan, 0.0, 1.0],
        [3.0e38, -3.0e38, 1.0],
    ],
)
def test_extreme_logits_never_nan(row: list[float]) -> None:
    e = entropy_from_logits(torch.tensor([row]))
    assert torch.isfinite(e).all()
    assert 0.0 <= e.item() <= math.log(3) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    z = torch.tensor([[60000.0, -60000.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=dtype)
    e = entropy_from_logits(z)
    assert e.dtype == torch.float32
    assert torch.isfinite(e).all()
    ref = entropy_from_logits(z.float())
    torch.testing.assert_close(e, ref)


def test_ties_between_two_classes() -> None:
    e = entropy_from_logits(torch.tensor([[5.0, 5.0, -1e9]]))
    assert e.item() == pytest.approx(math.log(2), abs=1e-6)


def test_inference_and_autograd_paths_give_the_same_bits() -> None:
    # without autograd the ops run in place; the values must not change
    torch.manual_seed(0)
    rows = torch.cat(
        [
            torch.randn(64, 10) * 4,
            torch.tensor([[1e30, -1e30] + [0.0] * 8, [math.inf, math.nan] + [1.0] * 8]),
        ]
    )
    plain = entropy_from_logits(rows)
    tracked = entropy_from_logits(rows.clone().requires_grad_())
    assert tracked.requires_grad
    assert torch.equal(plain, tracked.detach())
    with torch.no_grad():
        assert torch.equal(entropy_from_logits(rows.clone().requires_grad_()), plain)


def test_gradient_still_flows() -> None:
    z = torch.randn(4, 10, requires_grad=True)
    entropy_from_logits(z).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_one_row_shortcut_gives_the_same_bits_and_value() -> None:
    # entropy_of_one skips the guards a row does not need; the result must not change
    gen = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(1, 10, generator=gen) * s
        for s in (1e-5, 0.01, 1.0, 10.0, 1e3)
        for _ in range(50)
    ]
    # (the 1e-5 rows are near-uniform: their raw entropy often rounds above ln C)
    rows += [
        torch.zeros(1, 10),  # uniform: rounding can leave h just above ln C
        torch.zeros(1, 1),  # one class: h is -0.0 before the clamp
        torch.tensor([[1e4, 0.0, 0.0]]),
        torch.tensor([[5.0, 5.0, -1e9]]),
        torch.tensor([[1e30, -1e30, 0.0]]),
        torch.tensor([[3.0e38, -3.0e38, 1.0]]),  # spread overflows float32
        torch.tensor([[math.inf, 0.0, 0.0]]),
        torch.tensor([[math.nan, 0.0, 1.0]]),
        torch.tensor([[-math.inf, 0.0, 1.0]]),
        torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16),
    ]
    for z in rows:
        expected = entropy_from_logits(z)
        got, value = entropy_of_one(z)
        assert got.dtype == torch.float32 and got.shape == (1,)
        assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), z
        assert value == expected.item()
