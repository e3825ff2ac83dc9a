import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ktransfer.cli import main
from ktransfer.errors import KTransferError
from ktransfer.scout import (
    FEATURES, PairStatistics, ScoutedPair, ScoutPredictor, check_features, fit_predictor, flip_spread, leave_one_student_out, pair_statistics, routed_share, spearman, verdict,
)


def one_hot_logits(predictions, num_classes=3, confidence=4.0):
    logits = torch.zeros(len(predictions), num_classes)
    logits[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return logits


def test_statistics_by_hand():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    student = one_hot_logits([0, 0, 0, 0, 1, 2])  # right on 0, 3, 4, 5
    teacher = one_hot_logits([0, 1, 2, 1, 1, 0])  # right on 0, 1, 2, 4
    stats = pair_statistics(labels, student, teacher)
    assert stats.positive_flips == pytest.approx(100 * 2 / 6)  # samples 1 and 2
    assert stats.negative_flips == pytest.approx(100 * 2 / 6)  # samples 3 and 5
    assert stats.accuracy_gap == pytest.approx(0.0)
    # KL+DP routes to the teacher where its true-class probability is higher: samples 1, 2 (ties go to the student).
    assert stats.teacher_share == pytest.approx(100 * 2 / 6)
    # One flip in class 1, one in class 2: entropy ln 2 over ln 3.
    assert stats.flip_spread == pytest.approx(math.log(2) / math.log(3))
    assert flip_spread(labels, [0] * 6, [0, 1, 1, 0, 1, 0], 3) == 0.0  # two flips, both class 1
    softer = teacher.clone()
    softer[0] = torch.tensor([5.0, 0.0, 0.0])  # more confident than the student on sample 0: routed too
    assert routed_share(labels, student, softer) == pytest.approx(100 * 3 / 6)


def test_ensemble_delta_by_hand_and_as_a_feature_of_a_fit():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    student = one_hot_logits([0, 0, 0, 0, 1, 2])  # right on 0, 3, 4, 5: 66.7%
    teacher = one_hot_logits([0, 1, 2, 1, 1, 0])  # right on 0, 1, 2, 4
    teacher[[1, 2]] *= 1.5  # more confident than the student where only the teacher is right,
    teacher[[3, 5]] *= 0.5  # less where only the student is: the ensemble is right everywhere
    assert pair_statistics(labels, student, teacher).ensemble_delta == pytest.approx(100.0 - 100 * 4 / 6)
    assert pair_statistics(labels, student, student).ensemble_delta == 0.0  # a model with itself adds nothing
    # The shipped predictor keeps its four features; a fit may add ensemble Δ, and predictions follow the file's list.
    assert ScoutPredictor.load().features == list(FEATURES) and "ensemble_delta" not in FEATURES
    pairs = synthetic_pairs()
    for p, value in zip(pairs, np.linspace(-1, 3, len(pairs))):
        p.stats.ensemble_delta = float(value)
    names = ["ensemble_delta", "positive_flips"]
    predictor = fit_predictor([p.stats.features(names) for p in pairs], [p.delta for p in pairs], names)
    again = ScoutPredictor.from_dict(json.loads(json.dumps(predictor.to_dict())))
    assert again.features == names
    stats = pairs[3].stats
    by_hand = again.intercept + sum(c * (x - m) / sc for c, x, m, sc in zip(again.coefficients, [stats.ensemble_delta, stats.positive_flips], again.mean, again.scale))
    assert again.predict_pair(stats)[0] == pytest.approx(by_hand)
    with pytest.raises(KTransferError, match="choose among"):
        check_features(["ensemble_delta", "nonsense"])


def test_mismatched_label_spaces_fail_in_one_line():
    with pytest.raises(KTransferError, match="one label space"):
        pair_statistics(torch.tensor([0, 1]), torch.zeros(2, 3), torch.zeros(2, 4))


def test_spearman_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks [1.5, 1.5, 3] against [1, 2, 3]: r = 0.75 / sqrt(0.5 * 2) ... by hand 0.8660.
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def synthetic_pairs(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    pairs = []
    for s in range(5):
        for t in range(5):
            if s == t:
                continue
            f = rng.normal(size=4) * [3, 20, 5, 0.2] + [5, 30, 0, 0.7]
            delta = 0.5 * f[0] - 0.02 * f[1] + 0.3 * f[2] + noise * rng.normal()
            stats = PairStatistics(f"s{s}", f"t{t}", *f, negative_flips=1.0, student_accuracy=80.0, teacher_accuracy=80.0 + f[2], n=100)
            pairs.append(ScoutedPair(stats, float(delta), 10, 5, 1000, 1))
    return pairs


def test_fit_recovers_known_coefficients_and_round_trips(tmp_path):
    pairs = synthetic_pairs()
    X = np.array([p.stats.features() for p in pairs])
    y = np.array([p.delta for p in pairs])
    predictor = fit_predictor(X, y, ridge=0.0)
    raw = np.array(predictor.coefficients) / np.array(predictor.scale)
    assert raw == pytest.approx([0.5, -0.02, 0.3, 0.0], abs=1e-8)
    assert predictor.residual_low == pytest.approx(0, abs=1e-8) and predictor.residual_high == pytest.approx(0, abs=1e-8)
    loaded = ScoutPredictor.load(predictor.save(tmp_path / "p.json"))
    assert loaded.predict(X)[0] == pytest.approx(predictor.predict(X)[0])
    assert loaded.predict(X)[0] == pytest.approx(y)


def test_leave_one_student_out_ranks_a_clean_signal_and_not_noise():
    clean = leave_one_student_out(synthetic_pairs(noise=0.01), resamples=200)
    assert clean["pairs"] == 20 and clean["students"] == 5
    assert clean["loso"]["spearman"] > 0.95 and clean["loso"]["p_value"] < 0.01
    assert clean["loso"]["low"] <= clean["loso"]["spearman"] <= clean["loso"]["high"]
    noisy = leave_one_student_out(synthetic_pairs(noise=100.0), resamples=200)
    assert noisy["loso"]["low"] < 0.3  # the interval admits no correlation when Δ is all noise


def test_verdicts():
    assert verdict(0.1, 0.5) == "likely to help"
    assert verdict(-0.3, 0.0) == "unlikely to help"
    assert verdict(-0.3, 0.2) == "uncertain"


def test_the_shipped_predictor_loads():
    predictor = ScoutPredictor.load()
    assert predictor.n_pairs == 30 and len(predictor.coefficients) == 4
    assert predictor.evaluation["loso"]["n"] == 30 and predictor.method == "kl" and predictor.setting["evaluated_on"] == "fashion-mnist/validation"


def test_bad_input_gives_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["scout", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--predictor", str(tmp_path / "missing.json")])
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["scout", "--fit", str(tmp_path / "empty")])
    assert result.exit_code != 0 and "neither a study" in result.output
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something"}))
    result = runner.invoke(main, ["scout", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--predictor", str(tmp_path / "bad.json")])
    assert result.exit_code != 0 and "not a scouting predictor" in result.output
    result = runner.invoke(main, ["scout", "--student", "zoo:cnn"])
    assert result.exit_code != 0 and "at least one --teacher" in result.output


def test_scout_ranks_tiny_models(tiny_data):
    import ktransfer
    from ktransfer.models import Model, Preprocess

    _, evaluation = tiny_data

    def model(name, seed):
        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
        return Model(module, name, Preprocess(mean=(0.5,), std=(0.5,)))

    result = ktransfer.scout(model("student", 0), [model("a", 1), model("b", 2)], evaluation)
    assert len(result.teachers) == 2 and [t.predicted for t in result.teachers] == sorted([t.predicted for t in result.teachers], reverse=True)
    assert all(t.stats.n == len(evaluation) for t in result.teachers)


def test_fit_on_a_study_then_scout_from_the_command_line(small_fashion_mnist, tiny_zoo, tmp_path):
    """The whole path a user takes: a study evaluated on validation data, --fit on it, then scouting with the fitted file."""
    from ktransfer.study import Study, StudyConfig

    config = StudyConfig.from_dict({
        "name": "fit", "students": ["zoo:mlp", "zoo:cnn", "zoo:vit"], "methods": ["kl_dp"], "epochs": 1, "lr": 0.01, "batch_size": 64,
        "data": {"source": "fashion-mnist:validation", "dir": str(small_fashion_mnist)}, "controls": [],
    })
    study = Study(config, tmp_path / "fit")
    study.run(log=lambda line: None)
    runner = CliRunner(env={"COLUMNS": "250"})
    fitted = tmp_path / "predictor.json"
    result = runner.invoke(main, ["scout", "--fit", str(study.folder), "-o", str(fitted)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "Spearman" in result.output
    saved = json.loads(fitted.read_text())
    predictor = ScoutPredictor.load(fitted)
    assert predictor.method == "kl_dp" and saved["setting"]["evaluated_on"].startswith("fashion-mnist")
    assert saved["setting"]["n_eval"] == 200  # the validation split of the small look-alike, not its test set
    assert saved["features"] == list(FEATURES)
    with_ceiling = tmp_path / "with-ceiling.json"
    result = runner.invoke(main, ["scout", "--fit", str(study.folder), "-o", str(with_ceiling), "--features", "positive_flips,ensemble_delta"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ensemble Δ alone" in result.output
    assert json.loads(with_ceiling.read_text())["features"] == ["positive_flips", "ensemble_delta"]
    result = runner.invoke(main, ["scout", "--fit", str(study.folder), "--features", "ensemble"])
    assert result.exit_code != 0 and "choose among" in result.output

    ranking = tmp_path / "ranking.json"
    result = runner.invoke(main, [
        "scout", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--teacher", "zoo:vit", "--predictor", str(fitted),
        "--data", "fashion-mnist:validation", "--data-dir", str(small_fashion_mnist), "-o", str(ranking),
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "zoo:mlp" in result.output and "zoo:vit" in result.output and "ensemble Δ" in result.output
    written = json.loads(ranking.read_text())
    teachers = written["teachers"]
    assert {t["teacher"] for t in teachers} == {"zoo:mlp", "zoo:vit"}
    predicted = [t["predicted"] for t in teachers]
    assert predicted == sorted(predicted, reverse=True)
    assert all(t["low"] <= t["predicted"] <= t["high"] for t in teachers)


def test_fit_refuses_to_score_on_the_evaluation_data_it_is_fitted_on(small_fashion_mnist, tmp_path):
    """--score-on is a test of the predictor only on other data than the fitted study's, where its statistics and Δs come from."""
    from ktransfer.errors import ConfigError
    from ktransfer.scout import check_score_on, fit_study
    from ktransfer.study import Study, StudyConfig

    def study_folder(name, **data):
        config = StudyConfig.from_dict({
            "name": name, "students": ["zoo:mlp", "zoo:cnn", "zoo:vit"], "methods": ["kl"], "epochs": 1, "controls": [],
            "data": {**data, "dir": str(small_fashion_mnist)},
        })
        study = Study(config, tmp_path / name)
        study.folder.mkdir()
        study._write_config()  # a config is all the check reads: it refuses before any model runs
        return study.folder

    fitted = study_folder("fit", source="fashion-mnist:validation")
    again = study_folder("again", source="fashion-mnist:validation")
    part = study_folder("part", source="fashion-mnist:validation", eval_size=50)
    test = study_folder("test", source="fashion-mnist")
    with pytest.raises(ConfigError, match="is the study the predictor is fitted on"):
        fit_study(fitted, "kl", score_on=tmp_path / "test" / ".." / "fit")
    with pytest.raises(ConfigError, match=r"evaluated on fashion-mnist/validation, which shares 200 of its 200 samples with fashion-mnist/validation"):
        fit_study(fitted, "kl", score_on=again)
    with pytest.raises(ConfigError, match=r"shares 50 of its 50 samples with fashion-mnist/validation, the evaluation data of"):
        fit_study(fitted, "kl", score_on=part)
    check_score_on(fitted, test)  # the test set: other data, no objection
    check_score_on(test, fitted)
    result = CliRunner().invoke(main, ["scout", "--fit", str(fitted), "--score-on", f"{fitted}/", "--method", "kl"])
    assert result.exit_code != 0 and "is the study the predictor is fitted on" in result.output, result.output
