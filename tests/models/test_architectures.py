"""Every registered network: exit shapes, finite outputs, gradients reach every parameter."""

import itertools

import pytest
import torch

import models

ALL = models.list_models()
PAPER = ["lenet", "b-lenet", "alexnet", "b-alexnet", "resnet110", "b-resnet110"]


def test_registry_names() -> None:
    expected = set(PAPER)
    for depth in (20, 32, 56):
        expected |= {f"resnet{depth}", f"b-resnet{depth}"}
    assert expected <= set(ALL)


def test_unknown_model_and_option_are_named() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg")
    with pytest.raises(ValueError, match="unknown option.*'widht'"):
        models.build_model("b-lenet", widht=3)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.build_model("b-resnet20", depth=21)


@pytest.mark.parametrize("name", ALL)
def test_exit_shapes_and_gradients(name: str) -> None:
    net = models.build_model(name, num_classes=7)
    expected_exits = 1 if not name.startswith("b-") else (2 if "lenet" in name else 3)
    assert net.num_exits == expected_exits
    assert net.name == name
    x = torch.randn(2, *net.input_shape)
    outs = net(x)
    assert len(outs) == net.num_exits
    for out in outs:
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
    # the joint loss of BranchyNet: every exit's cross-entropy, summed
    y = torch.tensor([1, 3])
    loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
    loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


@pytest.mark.parametrize(
    ("plain", "branchy"),
    [("lenet", "b-lenet"), ("alexnet", "b-alexnet"), ("resnet20", "b-resnet20")],
)
def test_plain_net_is_branchy_trunk_without_side_branches(plain: str, branchy: str) -> None:
    p, b = models.build_model(plain), models.build_model(branchy)
    side = sum(x.numel() for h in b.heads[:-1] for x in h.parameters())
    assert sum(x.numel() for x in p.parameters()) == sum(x.numel() for x in b.parameters()) - side
    # the same trunk computes the same final logits once weights are shared
    trunk = [x for s in b.stages for x in s.state_dict().values()] + list(
        b.heads[-1].state_dict().values()
    )
    p.load_state_dict(dict(zip(p.state_dict().keys(), trunk, strict=True)))
    p.eval(), b.eval()
    x = torch.randn(3, *p.input_shape)
    torch.testing.assert_close(p(x)[0], b(x)[-1])


def test_paper_resnet110_size() -> None:
    n = sum(p.numel() for p in models.build_model("resnet110").parameters())
    assert 1.70e6 < n < 1.75e6  # "about 1.73 M parameters"


def test_alexnet_branch_depth_option() -> None:
    sizes = [
        sum(p.numel() for p in models.build_model("b-alexnet", b1_extra_convs=k).parameters())
        for k in range(5)
    ]
    conv32 = 32 * 32 * 9 + 32
    assert [b - a for a, b in itertools.pairwise(sizes)] == [conv32] * 4
    with pytest.raises(ValueError, match="b1_extra_convs"):
        models.build_model("b-alexnet", b1_extra_convs=-1)
