"""scripts/weight_interpolation.py: the interpolation is exact at its ends, linear between them, chosen on one
half of the validation split, and docs/demo.md's numbers are the data file's."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from script_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "figures" / "weight-interpolation.jsonl"


@pytest.fixture(scope="module")
def script():
    return load_script("weight_interpolation")


def states():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    net(torch.randn(8, 1, 6, 6))  # moves the batch-norm statistics and its step counter
    original = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net(torch.randn(8, 1, 6, 6))
    return original, {k: v.clone() for k, v in net.state_dict().items()}


def test_interpolation_ends_midpoint_and_counters(script):
    original, transferred = states()
    assert original["1.num_batches_tracked"] == 1 and transferred["1.num_batches_tracked"] == 2
    for key, value in script.interpolate(original, transferred, 0.0).items():
        assert torch.equal(value, transferred[key] if not value.is_floating_point() else original[key]), key
    for key, value in script.interpolate(original, transferred, 1.0).items():
        assert torch.equal(value, transferred[key]), key
    half = script.interpolate(original, transferred, 0.5)
    for key, value in half.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, (original[key] + transferred[key]) / 2)
    assert half["1.num_batches_tracked"] == 2  # a counter is not interpolated


def test_the_choice_reads_only_the_choosing_half(script):
    curve = [{"weight": 0.0, "delta_choose": 0.0, "delta_read": 5.0}, {"weight": 0.5, "delta_choose": 0.3, "delta_read": -1.0},
             {"weight": 1.0, "delta_choose": 0.3, "delta_read": 0.2}]
    chosen = script.choose(curve)
    assert chosen["weight"] == 1.0  # the tie goes to the larger weight; the reading half's +5.0 is never looked at


def signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def test_the_page_holds_the_data_files_numbers():
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert rows and all(len(row["curve"]) == 11 and row["curve"][-1]["delta_read"] == row["delta_final_read"] for row in rows)
    page = (ROOT / "docs" / "demo.md").read_text()
    table = page[page.index("| pair | epochs | method | after the transfer | interpolated"):].split("\n\n", 1)[0].splitlines()[2:]
    cells = {}
    for line in table:
        pair, epochs, method, final, chosen = [c.strip() for c in line.strip("|").split("|")][:5]
        cells[(pair.replace(" ← ", "<"), int(epochs), method.strip("`"))] = (final, chosen)
    assert len(cells) == len(rows)
    for row in rows:
        final, chosen = cells[(row["pair"], row["epochs"], row["method"])]
        assert final == signed(row["delta_final_read"])
        assert chosen == f"{signed(row['delta_chosen_read'])} (α {row['chosen_weight']:.1f})"
