import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from ktransfer.analysis import ComplementarityAnalysis, analyze, analyze_predictions, per_class_flip_tensor
from ktransfer.cli import main
from ktransfer.errors import ConfigError
from ktransfer.metrics import per_class_positive_flips
from ktransfer.models.base import Model
from ktransfer.predictions import PredictionCache

CLASSES = ["c0", "c1", "c2"]
LABELS = [0, 0, 1, 1, 2, 2]
PREDICTIONS = {
    "A": [0, 1, 1, 0, 2, 0],  # right on samples 0, 2, 4
    "B": [0, 0, 0, 1, 1, 2],  # right on 0, 1, 3, 5
    "C": [1, 0, 1, 1, 2, 2],  # right on 1, 2, 3, 4, 5
}


@pytest.fixture
def hand():
    return analyze_predictions(LABELS, PREDICTIONS, CLASSES)


def test_flip_matrices_and_per_class_counts_by_hand(hand):
    a, b, c = (hand.index(n) for n in "ABC")
    # A wrong and B right on samples 1, 3, 5: one of each class.
    assert hand.positive_flips[a, b] == pytest.approx(50.0)
    assert hand.per_class[a, b].tolist() == [1, 1, 1]
    # B wrong and A right on samples 2 (class 1) and 4 (class 2).
    assert hand.positive_flips[b, a] == pytest.approx(100 * 2 / 6)
    assert hand.per_class[b, a].tolist() == [0, 1, 1]
    assert hand.per_class[c, a].tolist() == [1, 0, 0]
    assert hand.per_class[c, b].tolist() == [1, 0, 0]
    assert hand.per_class[b, c].tolist() == [0, 1, 1]
    # ρ_neg(s→t) is ρ_pos(t→s); the diagonal holds nothing.
    np.testing.assert_allclose(hand.negative_flips, hand.positive_flips.T)
    assert np.all(np.diagonal(hand.per_class, axis1=0, axis2=1) == 0)
    assert hand.accuracy == {"A": pytest.approx(50.0), "B": pytest.approx(100 * 4 / 6), "C": pytest.approx(100 * 5 / 6)}
    assert hand.n_eval == 6


def test_all_pairs_tensor_matches_the_single_pair_function_and_the_matrix():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 7, 500)
    predictions = [np.where(generator.random(500) < p, labels, generator.integers(0, 7, 500)) for p in (0.3, 0.6, 0.8, 0.9)]
    tensor = per_class_flip_tensor(labels, predictions, 7)
    analysis = analyze_predictions(labels, {str(i): p for i, p in enumerate(predictions)}, [str(c) for c in range(7)])
    for i in range(4):
        for j in range(4):
            if i != j:
                assert tensor[i, j].tolist() == per_class_positive_flips(labels, predictions[i], predictions[j], 7).tolist()
                assert 100 * tensor[i, j].sum() / 500 == pytest.approx(analysis.positive_flips[i, j])


def test_pair_view_entropy_and_top_classes_by_name(hand):
    concentrated = hand.pair_view("C", "A")  # one flip, in class c0
    assert concentrated["counts"] == [1, 0, 0] and concentrated["entropy"] == 0.0
    assert concentrated["uniform_entropy"] == pytest.approx(math.log(3))
    assert concentrated["top_classes"][50.0] == ["c0"]
    spread = hand.pair_view("A", "B")  # one flip in each class: as spread as it gets
    assert spread["entropy"] == pytest.approx(math.log(3))
    assert spread["top_classes"][2.0] == ["c0"]
    assert spread["top_classes"][50.0] == ["c0", "c1"]  # 2 of 3 flips is the first share >= 50%
    assert spread["n_eval"] == 6 and spread["flip_count"] == 3
    assert len(hand.pair_views()) == 6
    with pytest.raises(ConfigError, match="not in this analysis"):
        hand.pair_view("A", "Z")
    with pytest.raises(ConfigError, match="two different models"):
        hand.pair_view("A", "A")


def test_save_and_load_round_trip_and_the_demos_older_file(hand, tmp_path):
    path = hand.save(tmp_path / "complementarity.json")
    loaded = ComplementarityAnalysis.load(path)
    assert loaded.models == hand.models and loaded.class_names == CLASSES
    np.testing.assert_array_equal(loaded.per_class, hand.per_class)
    assert loaded.pair_view("A", "B") == hand.pair_view("A", "B")
    # The demo's first format had only the matrices: it still loads, without per-class counts.
    old = {k: v for k, v in json.loads(path.read_text()).items() if k in ("models", "positive_flips", "negative_flips", "n_eval")}
    legacy = ComplementarityAnalysis.from_dict(old)
    assert not legacy.has_per_class and legacy.positive_flips.shape == (3, 3)


class CountingClassifier(nn.Module):
    """A fixed linear classifier that counts the samples it has seen."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = 3
        self.linear = nn.Linear(16, 3)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.linear(x.flatten(1))


def test_analyze_runs_each_model_once_over_the_data():
    from ktransfer.data.base import ImageData

    images = torch.randint(0, 255, (40, 1, 4, 4), dtype=torch.uint8)
    data = ImageData(images, torch.arange(40) % 3, CLASSES, "counting")
    modules = {name: CountingClassifier(seed) for seed, name in enumerate(("m1", "m2", "m3", "m4"))}
    analysis = analyze({name: Model(module, name) for name, module in modules.items()}, data, PredictionCache(enabled=False))
    assert [m.seen for m in modules.values()] == [40, 40, 40, 40]  # N passes, not one per pair
    assert analysis.positive_flips.shape == (4, 4) and analysis.per_class.shape == (4, 4, 3)


def test_analyze_command_prints_matrices_and_the_chosen_pair(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "analysis.json"
    runner = CliRunner()
    result = runner.invoke(main, ["analyze", "--models", "zoo:mlp,zoo:cnn,zoo:resnet", "--pair", "zoo:mlp,zoo:cnn", "--out", str(out), "--data-dir", str(small_fashion_mnist)])
    assert result.exit_code == 0, result.output
    assert "ρ_pos" in result.output and "ρ_neg" in result.output and "entropy" in result.output
    saved = json.loads(out.read_text())
    assert saved["models"] == ["zoo:mlp", "zoo:cnn", "zoo:resnet"] and saved["n_eval"] == 200
    assert np.asarray(saved["per_class_positive_flips"]).shape == (3, 3, 10)
    bad = runner.invoke(main, ["analyze", "--models", "zoo:mlp,zoo:cnn", "--pair", "zoo:mlp", "--data-dir", str(small_fashion_mnist)])
    assert bad.exit_code != 0 and "--pair takes STUDENT,TEACHER" in bad.output
