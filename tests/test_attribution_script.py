"""scripts/attribution.py: its counts on a hand-built case, and the shares it pools from them."""

import pytest
import torch

from script_helpers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("attribution")


def test_counts_hand_computed(script):
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])
    # image:          0  1  2  3  4  5  6  7
    before = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])  # wrong on 0-3, right on 4-7
    teacher = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1])  # right on 0, 1, 4, 6
    after = torch.tensor([0, 1, 0, 1, 1, 1, 0, 0])  # gains 0 and 2, losses 4 and 5
    counts = script.attribution_counts(labels, before, teacher, after)
    assert counts == {"errors": 4, "positive_flips": 2, "gains": 2, "gains_teacher_right": 1, "closed": 1, "losses": 2, "losses_teacher_wrong": 1}
    summary = script.summarize(counts + script.attribution_counts(labels, before, teacher, before))  # an unchanged run adds errors only
    assert summary == {"base_rate": 50.0, "gains": 2, "gains_on_teacher_right": 50.0, "closed": 25.0, "losses": 2, "losses_on_teacher_wrong": 50.0}


def test_shares_are_undefined_without_a_denominator(script):
    labels = torch.tensor([0, 1])
    counts = script.attribution_counts(labels, labels.clone(), labels.clone(), labels.clone())  # nothing wrong, nothing moves
    summary = script.summarize(counts)
    assert summary["base_rate"] is None and summary["gains_on_teacher_right"] is None and summary["losses_on_teacher_wrong"] is None
    assert summary["gains"] == summary["losses"] == 0
