"""The branchy network: trunk stages with one exit head after each, and the batched
early-exit engine that runs them.

A network with E exits has E trunk stages and E heads. Exit ``i`` reads the output of
stage ``i``; the last head is the main network's classifier. A plain network (LeNet,
AlexNet, ResNet) is the same class with a single exit, so one engine runs and times both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from models.engine import EarlyExits, ExitResult, TorchExecutor  # noqa: F401 (ExitResult re-exported)
from models.inference import shared_prefix
from models.macs import exit_macs


class BranchyNet(EarlyExits, nn.Module):
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

    def _executor(self) -> TorchExecutor:
        # early_exit (from EarlyExits) runs on the eager engine over this network
        return TorchExecutor(self)

    def shared_prefixes(self) -> list[int]:
        """Per exit, how many leading layers its head shares with the next trunk stage
        (:func:`models.inference.shared_prefix`; 0 for the last exit). The batched
        engine runs those layers once, as the end of the stage."""
        heads = list(self.heads._modules.values())  # ModuleList indexing costs ~1.4 µs
        stages = list(self.stages._modules.values())
        return [shared_prefix(h, s) for h, s in zip(heads, stages[1:], strict=False)] + [0]

    def exit_macs(self) -> list[int]:
        """Multiply-accumulates to reach and evaluate each exit, for one sample.

        :func:`models.macs.exit_macs` of this network, cached on it.
        """
        if self._exit_macs is None:  # the architecture fixes them: counted once
            self._exit_macs = exit_macs(self)
        return list(self._exit_macs)
