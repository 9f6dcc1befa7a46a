"""The branchy network: trunk stages with one exit head after each, and the batched
early-exit engine that runs them.

A network with E exits has E trunk stages and E heads. Exit ``i`` reads the output of
stage ``i``; the last head is the main network's classifier. A plain network (LeNet,
AlexNet, ResNet) is the same class with a single exit, so one engine runs and times both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn

from models.exits import (
    entropy_from_logits,
    entropy_of_one,
    threshold_matrix,
    thresholds_for_one,
)
from models.inference import (
    global_hooks_active,
    run_module,
    run_owned,
    run_stage,
    shared_prefix,
)


@dataclass(frozen=True)
class ExitResult:
    """What :meth:`BranchyNet.early_exit` answers for a batch of B samples.

    Attributes:
        logits: ``(B, C)`` float32 logits of the exit each sample took.
        exit_index: ``(B,)`` int64, 0-based index of that exit.
        entropy: ``(B,)`` float32 entropy (nats) of the softmax at that exit.
    """

    logits: Tensor
    exit_index: Tensor
    entropy: Tensor

    @property
    def prediction(self) -> Tensor:
        """``(B,)`` int64 predicted class."""
        return self.logits.argmax(dim=1)

    def to(self, device: torch.device | str) -> ExitResult:
        return ExitResult(
            self.logits.to(device), self.exit_index.to(device), self.entropy.to(device)
        )


def _plain_numbers(values: object) -> TypeGuard[Sequence[float]]:
    # a flat list/tuple of Python numbers: the batch-of-one fast path applies
    return isinstance(values, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


class BranchyNet(nn.Module):
    """An ordered list of trunk stages with one exit head per stage.

    Args:
        stages: trunk segments; ``stages[i]`` maps the output of ``stages[i-1]`` on.
        heads: ``heads[i]`` maps the output of ``stages[i]`` to ``(B, num_classes)`` logits.
        name: registry name of the architecture, e.g. ``"b-lenet"``.
        config: the config dataclass that rebuilds it (stored in checkpoints).
        input_shape: ``(C, H, W)`` the network expects.
        num_classes: width of every head's logits.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        name: str,
        config: Any,
        input_shape: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError(
                f"need one head per stage and at least one of each; "
                f"got {len(stages)} stages and {len(heads)} heads"
            )
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.name = name
        self.config = config
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self._exit_macs: list[int] | None = None

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def config_dict(self) -> dict[str, Any]:
        """The architecture config as plain JSON-able data."""
        return dataclasses.asdict(self.config)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit, for joint training: ``num_exits`` × ``(B, C)``."""
        outs = []
        h = x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            outs.append(head(h))
        return outs

    def early_exit(self, x: Tensor, thresholds: Sequence[float] | Tensor = ()) -> ExitResult:
        """Classify a batch, letting each sample leave at the first confident exit.

        At early exit ``i`` a sample whose entropy is strictly below its threshold
        ``T_i`` leaves with that exit's logits; only the samples still in flight run the
        following stages (the batch is compacted after every exit). The last exit
        answers for everything that reaches it.

        Args:
            x: ``(B, C, H, W)`` input batch, on the model's device.
            thresholds: ``num_exits - 1`` floats, or a ``(B, num_exits - 1)`` tensor of
                per-sample thresholds. ``0`` lets nobody leave at that exit, ``inf``
                everybody.

        Returns:
            The exit taken, its logits and entropy, per sample, in input order.
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self._early_exit(x, thresholds)
        return self._early_exit(x, thresholds)  # the caller already disabled autograd

    def _early_exit(self, x: Tensor, thresholds: Sequence[float] | Tensor) -> ExitResult:
        n = x.shape[0]
        last = self.num_exits - 1
        if n == 1 and _plain_numbers(thresholds):
            return self._early_exit_one(x, thresholds_for_one(thresholds, num_early_exits=last))
        t = threshold_matrix(thresholds, batch_size=n, num_early_exits=last, device=x.device)
        if n == 1:
            return self._early_exit_one(x, t[0].tolist())

        logits = torch.empty((n, self.num_classes), dtype=torch.float32, device=x.device)
        exit_index = torch.full((n,), last, dtype=torch.int64, device=x.device)
        entropy = torch.empty((n,), dtype=torch.float32, device=x.device)
        # `alive` maps rows of the compacted batch back to input positions.
        alive = torch.arange(n, device=x.device)
        hooked = global_hooks_active()
        shared = [0] * self.num_exits if hooked else self.shared_prefixes()
        h, owned, skip = x, False, 0  # x is the caller's: never overwritten
        for i, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            if alive.numel() == 0:
                break
            if hooked:
                h = stage(h)
                z = head(h).float()
            else:
                # layers this head shares with the next stage run once, for both
                h, owned = run_stage(stage, head, h, skip=skip, prefix=shared[i], owned=owned)
                skip = shared[i]
                z = run_module(head, h, start=skip, owned=owned and i == last).float()  # (b, C)
            e = entropy_from_logits(z)  # (b,)
            if i == last:
                logits[alive] = z
                entropy[alive] = e
                break
            leave = e < t[:, i]
            rows = leave.nonzero().squeeze(1)  # one host sync per exit, inherent
            if rows.numel():
                dst = alive[rows]
                logits[dst] = z[rows]
                entropy[dst] = e[rows]
                exit_index[dst] = i
                stay = (~leave).nonzero().squeeze(1)
                h, alive, t, owned = h[stay], alive[stay], t[stay], True
        return ExitResult(logits, exit_index, entropy)

    def _early_exit_one(self, x: Tensor, thresholds: list[float]) -> ExitResult:
        # Batch of one: no compaction bookkeeping, one scalar decision per exit. On a
        # CPU a tiny net's time is mostly per-operator overhead, so this path matters.
        # (No shared head/stage prefixes here: finding them costs more than they save
        # for a tiny net's one sample.)
        last = self.num_exits - 1
        hooked = global_hooks_active()
        h, owned = x, False
        for i, (stage, head) in enumerate(zip(self.stages, self.heads, strict=True)):
            if hooked:
                h = stage(h)
                z = head(h).float()
            else:
                h, owned = run_owned(stage, h, owned=owned)
                z = run_module(head, h, owned=owned and i == last).float()
            if i == last and not z.is_cpu:
                e = entropy_from_logits(z)  # no decision left: no need to sync on the value
            else:
                # the decision needs the value on the host; on a CPU, having it also lets
                # entropy_of_one skip the guards this sample does not need
                e, value = entropy_of_one(z)
                if i < last and not value < thresholds[i]:
                    continue  # not confident enough: on to the next stage
            index = torch.full((1,), i, dtype=torch.int64, device=x.device)
            return ExitResult(z, index, e)
        raise AssertionError("unreachable: the last exit always answers")

    def shared_prefixes(self) -> list[int]:
        """Per exit, how many leading layers its head shares with the next trunk stage
        (:func:`models.inference.shared_prefix`; 0 for the last exit). The batched
        engine runs those layers once, as the end of the stage."""
        heads = list(self.heads._modules.values())  # ModuleList indexing costs ~1.4 µs
        stages = list(self.stages._modules.values())
        return [shared_prefix(h, s) for h, s in zip(heads, stages[1:], strict=False)] + [0]

    def exit_macs(self) -> list[int]:
        """Multiply-accumulates to reach and evaluate each exit, for one sample.

        Entry ``i`` counts stages ``0..i`` and heads ``0..i``: a sample leaving at exit
        ``i`` has paid for every earlier head too. Counted from conv and linear layers
        by running one dummy sample, not typed in by hand.
        """
        if self._exit_macs is None:
            from models.macs import stage_and_head_macs

            stage_macs, head_macs = stage_and_head_macs(self)
            total, cumulative = 0, []
            for s, h in zip(stage_macs, head_macs, strict=True):
                total += s + h
                cumulative.append(total)
            self._exit_macs = cumulative
        return list(self._exit_macs)
