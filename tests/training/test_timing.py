"""The timing helpers behind the report's time-ideal gain."""

from __future__ import annotations

import pytest
import torch

import models
from training import timing


def test_prediction_charges_each_sample_the_segments_up_to_its_exit() -> None:
    seg = timing.SegmentTimes(stages=[10.0, 30.0, 100.0], heads=[2.0, 3.0, 5.0])
    # exit 0: 12; exit 1: 12 + 33 = 45; exit 2: 45 + 105 = 150
    assert timing.predicted_seconds_per_image(seg, [1.0, 0.0, 0.0]) == 12.0
    assert timing.predicted_seconds_per_image(seg, [0.0, 0.0, 1.0]) == 150.0
    mixed = timing.predicted_seconds_per_image(seg, [0.5, 0.25, 0.25])
    assert mixed == pytest.approx(0.5 * 12 + 0.25 * 45 + 0.25 * 150)
    plain = timing.SegmentTimes(stages=[7.0], heads=[1.0])
    assert timing.predicted_seconds_per_image(plain, [1.0]) == 8.0
    with pytest.raises(ValueError, match="one exit share per exit"):
        timing.predicted_seconds_per_image(seg, [0.5, 0.5])


def test_best_is_taken_segment_by_segment() -> None:
    runs = [
        timing.SegmentTimes([3.0, 1.0], [5.0, 9.0]),
        timing.SegmentTimes([2.0, 4.0], [6.0, 8.0]),
    ]
    assert timing.SegmentTimes.best(runs) == timing.SegmentTimes([2.0, 1.0], [5.0, 8.0])


def test_segment_times_of_a_real_net() -> None:
    torch.manual_seed(0)
    net = models.build_model("b-lenet").eval()
    x = torch.randn(40, *net.input_shape)
    seg = timing.segment_times(net, x, batch_size=16, repeats=2)
    assert len(seg.stages) == len(seg.heads) == net.num_exits
    assert all(t > 0 for t in seg.stages + seg.heads)
    # the trunk after the branch (three convs) costs more than the first conv alone
    assert seg.stages[1] > seg.stages[0]
