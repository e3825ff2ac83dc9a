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


# --------------------------------------------------------------------------- the ceiling and the transfer-set diagnostics


def test_ceiling_matrices_by_hand_and_the_oracle_identity():
    labels = [0, 1, 1]
    probs = {
        "A": np.array([[0.6, 0.4], [0.6, 0.4], [0.9, 0.1]]),   # right on 0: 33.3%
        "B": np.array([[0.45, 0.55], [0.2, 0.8], [0.55, 0.45]]),  # right on 1: 33.3%
    }
    predictions = {name: p.argmax(1) for name, p in probs.items()}
    analysis = analyze_predictions(labels, predictions, ["x", "y"], probs)
    # mean: [.525 .475] right, [.4 .6] right, [.725 .275] wrong: ensemble 66.7%, Δ +33.3 for either student
    assert analysis.ensemble_delta[0, 1] == pytest.approx(100 / 3) and analysis.ensemble_delta[1, 0] == pytest.approx(100 / 3)
    assert analysis.ensemble_delta[0, 0] == 0.0
    assert analysis.oracle[0, 1] == pytest.approx(200 / 3) and analysis.oracle[1, 0] == pytest.approx(200 / 3)
    # oracle = the student's accuracy + ρ_pos(student → teacher), on any data
    generator = np.random.default_rng(1)
    labels = generator.integers(0, 4, 300)
    probs = {str(i): generator.dirichlet(np.ones(4), 300) for i in range(3)}
    big = analyze_predictions(labels, {k: p.argmax(1) for k, p in probs.items()}, list("abcd"), probs)
    for i, name in enumerate(big.models):
        for j in range(3):
            if i != j:
                assert big.oracle[i, j] == pytest.approx(big.accuracy[name] + big.positive_flips[i, j])
                assert big.ensemble_delta[i, j] - big.ensemble_delta[j, i] == pytest.approx(big.accuracy[big.models[j]] - big.accuracy[name])
    loaded = ComplementarityAnalysis.from_dict(json.loads(json.dumps(big.to_dict())))
    np.testing.assert_allclose(loaded.ensemble_delta, big.ensemble_delta)
    np.testing.assert_allclose(loaded.oracle, big.oracle)
    assert ComplementarityAnalysis.from_dict(analyze_predictions([0, 1], {"a": [0, 0], "b": [1, 1]}, ["x", "y"]).to_dict()).ensemble_delta is None


def test_transfer_set_diagnostics_by_hand():
    from ktransfer.analysis import diagnose_probabilities

    # On the transfer set both models are confident and right but the teacher is right where the student is not once.
    transfer_labels = [0, 1, 1, 0]
    transfer = {
        "s": np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.4], [0.9, 0.1]]),
        "t": np.array([[0.5, 0.5], [0.0, 1.0], [0.2, 0.8], [0.8, 0.2]]),
    }
    held_labels = [0, 1]
    held = {"s": np.array([[0.5, 0.5], [0.5, 0.5]]), "t": np.array([[0.7, 0.3], [0.4, 0.6]])}
    d = diagnose_probabilities(transfer_labels, transfer, held_labels, held, transfer_name="tr", held_out_name="ho")
    s = d.per_model["s"]
    assert s["transfer_acc"] == 75.0 and s["transfer_true_class_probability"] == pytest.approx(100 * (1 + 1 + 0.4 + 0.9) / 4)
    assert s["held_out_true_class_probability"] == 50.0 and s["held_out_entropy"] == pytest.approx(math.log(2))
    assert s["transfer_entropy"] == pytest.approx((0 + 0 + (-(0.6 * math.log(0.6) + 0.4 * math.log(0.4))) + (-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))) / 4)
    # ρ_pos(s → t) on the transfer set: sample 2 (s says 0, t says 1): 25%; held out s is right on 0 (argmax tie → class 0), t on both.
    assert d.positive_flips_transfer[0, 1] == 25.0 and d.positive_flips_held_out[0, 1] == 50.0
    s_to_t = next(r for r in d.routing if r["student"] == "s")
    # routed to t: sample 2 (.8 > .4) only; ties (sample 1) stay with the student; sample 2 is useful
    assert (s_to_t["routed_count"], s_to_t["routed_useful_count"], s_to_t["routed"], s_to_t["routed_useful"]) == (1, 1, 25.0, 100.0)
    t_to_s = next(r for r in d.routing if r["student"] == "t")
    # routed to s: samples 0 (1 > .5) and 3 (.9 > .8); t is right on both: nothing useful
    assert (t_to_s["routed_count"], t_to_s["routed_useful_count"]) == (2, 0)
    assert d.n_transfer == 4 and d.n_held_out == 2 and d.to_dict()["transfer_data"] == "tr"


def test_analyze_command_shows_the_ceiling_and_the_transfer_set_diagnostics(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.analysis import diagnose_transfer_set
    from ktransfer.data import fashion_mnist
    from ktransfer.models import load_model

    out = tmp_path / "analysis.json"
    runner = CliRunner()
    specs = ["zoo:mlp", "zoo:cnn"]
    result = runner.invoke(main, ["analyze", "--models", ",".join(specs), "--out", str(out), "--data-dir", str(small_fashion_mnist)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    for text in ("Ceiling: ensemble Δ", "Oracle %", "What the transfer set can carry", "p(true) transfer", "useful % of routed"):
        assert text in result.output
    saved = json.loads(out.read_text())
    diagnostics = saved["transfer_set_diagnostics"]
    splits = fashion_mnist.load(small_fashion_mnist)
    # The default transfer data is the demo's transfer split, held out = the evaluation data.
    assert diagnostics["transfer_data"] == splits.transfer.name and diagnostics["n_transfer"] == len(splits.transfer) == 100
    assert diagnostics["held_out_data"] == splits.eval.name and diagnostics["n_held_out"] == 200
    models = {spec: load_model(spec, data_dir=small_fashion_mnist) for spec in specs}
    expected = diagnose_transfer_set(models, splits.transfer, splits.eval, PredictionCache(enabled=False))
    for spec in specs:
        assert diagnostics["per_model"][spec] == pytest.approx(expected.per_model[spec])
    assert np.asarray(saved["ensemble_delta"]).shape == (2, 2) and np.asarray(saved["oracle_accuracy"]).shape == (2, 2)
    other = runner.invoke(main, ["analyze", "--models", ",".join(specs), "--transfer-data", "fashion-mnist:validation", "--out", str(out), "--data-dir", str(small_fashion_mnist)])
    assert other.exit_code == 0, other.output
    assert json.loads(out.read_text())["transfer_set_diagnostics"]["transfer_data"] == splits.validation.name
    skipped = runner.invoke(main, ["analyze", "--models", ",".join(specs), "--transfer-data", "none", "--data-dir", str(small_fashion_mnist)], env={"COLUMNS": "300"})
    assert skipped.exit_code == 0 and "Ceiling: ensemble Δ" in skipped.output and "What the transfer set can carry" not in skipped.output
