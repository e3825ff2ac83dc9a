import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ktransfer.cli import main
from ktransfer.errors import KTransferError
from ktransfer.scout import (
    FEATURES, PairStatistics, ScoutedPair, ScoutPredictor, check_features, fit_predictor, flip_spread, held_out_predictions, leave_one_student_out, pair_statistics, routed_share, spearman, verdict,
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


def mirrored_pairs(models=5, seed=0):
    """Every ordered pair of ``models`` models, each model a student and a teacher, with mirrored features:
    ρ_pos(s→t) = ρ_neg(t→s) and accuracy_gap(t, s) = −accuracy_gap(s, t), as real pairs have them."""
    rng = np.random.default_rng(seed)
    accuracy = rng.uniform(70, 90, models)
    wrong_right = rng.uniform(1, 10, (models, models))  # [s, t]: share s gets wrong and t right
    pairs = []
    for s in range(models):
        for t in range(models):
            if s != t:
                gap = accuracy[t] - accuracy[s]
                stats = PairStatistics(f"m{s}", f"m{t}", wrong_right[s, t], 50 + gap, gap, 0.5 + 0.01 * s + 0.001 * t,
                                       negative_flips=wrong_right[t, s], student_accuracy=accuracy[s], teacher_accuracy=accuracy[t], n=100)
                pairs.append(ScoutedPair(stats, float(0.2 * gap + 0.1 * wrong_right[s, t] + rng.normal()), 10, 5, 1000, 1))
    return pairs


def test_leave_one_model_out_fits_on_no_pair_involving_the_held_out_model(monkeypatch):
    fitting = importlib.import_module("ktransfer.scout.fitting")  # where held_out_predictions looks fit_predictor up

    pairs = mirrored_pairs()
    names = {tuple(p.stats.features()): (p.stats.student, p.stats.teacher) for p in pairs}
    fitted_on = []

    def recording_fit(features, deltas, *args, **kwargs):
        fitted_on.append([names[tuple(row)] for row in features])
        return fit_predictor(features, deltas, *args, **kwargs)

    monkeypatch.setattr(fitting, "fit_predictor", recording_fit)
    students = [f"m{i}" for i in range(5)]  # held out in this order
    predicted, note = held_out_predictions(pairs, "model")
    assert note is None and len(fitted_on) == 5 and predicted.shape == (20,)
    for held, train in zip(students, fitted_on):
        assert len(train) == 12 and all(held not in pair for pair in train)  # the 4 other models' 4·3 pairs
    fitted_on.clear()
    held_out_predictions(pairs, "student")
    for held, train in zip(students, fitted_on):
        # leave-one-student-out: 16 pairs, 4 of them with the held-out student as the teacher
        assert len(train) == 16 and sum(t == held for _, t in train) == 4 and all(s != held for s, _ in train)


def test_the_fit_report_gives_both_splits_and_they_differ_only_where_a_student_also_teaches():
    mirrored = leave_one_student_out(mirrored_pairs(), resamples=50)
    assert mirrored["lomo"]["n"] == mirrored["loso"]["n"] == 20 and mirrored["lomo_note"] is None
    assert mirrored["predicted_lomo"] != pytest.approx(mirrored["predicted"])
    # Students that never teach (disjoint names): nothing more to hold out, the two splits agree exactly.
    disjoint = leave_one_student_out(synthetic_pairs(noise=0.5), resamples=50)
    assert disjoint["predicted_lomo"] == pytest.approx(disjoint["predicted"], abs=1e-12)
    assert disjoint["lomo"]["spearman"] == pytest.approx(disjoint["loso"]["spearman"])


def test_leave_one_model_out_says_why_when_too_few_pairs_remain():
    three = [p for p in mirrored_pairs(models=3)]  # holding out one of 3 models leaves its 2 mirror-free pairs
    result = leave_one_student_out(three, resamples=20)
    assert result["lomo"] is None and result["predicted_lomo"] is None
    assert result["lomo_note"] == "holding out m0 leaves 2 training pairs (a fit needs 3)"
    assert result["loso"]["n"] == 6  # leave-one-student-out still has 4 training pairs


def test_the_fit_summary_heads_with_leave_one_model_out_and_shows_both():
    from ktransfer.cli.scout_cmd import fit_summary

    pairs = mirrored_pairs()
    predictor = fit_predictor([p.stats.features() for p in pairs], [p.delta for p in pairs])
    evaluation = leave_one_student_out(pairs, resamples=50)
    predictor.evaluation = {k: v for k, v in evaluation.items() if not k.startswith("predicted")}
    lines = fit_summary(predictor)
    lomo = next(i for i, line in enumerate(lines) if line.startswith("leave-one-model-out Spearman"))
    loso = next(i for i, line in enumerate(lines) if line.startswith("leave-one-student-out Spearman"))
    assert lomo < loso and f"{evaluation['lomo']['spearman']:+.2f}" in lines[lomo] and f"{evaluation['loso']['spearman']:+.2f}" in lines[loso]
    shipped = fit_summary(ScoutPredictor.load())  # fitted before the split existed: said, not invented
    assert any(line.startswith("leave-one-model-out Spearman: not computed") for line in shipped)


def test_verdicts():
    assert verdict(0.1, 0.5) == "likely to help"
    assert verdict(-0.3, 0.0) == "unlikely to help"
    assert verdict(-0.3, 0.2) == "uncertain"


def test_the_shipped_predictor_loads():
    predictor = ScoutPredictor.load()
    assert predictor.n_pairs == 30 and len(predictor.coefficients) == 4
    assert predictor.evaluation["loso"]["n"] == 30 and predictor.method == "kl" and predictor.setting["evaluated_on"] == "fashion-mnist/validation"


def test_the_shipped_predictor_predicts_by_its_formula_on_features_built_by_hand():
    # Its 30 pairs' per-pair Δs are not shipped, so its Spearman cannot be recomputed here; its predictions can.
    predictor = ScoutPredictor.load()
    mean, scale = np.array(predictor.mean), np.array(predictor.scale)
    # The statistics' average pair predicts the intercept, which the unpenalised ridge sets to the mean realised Δ.
    predicted, low, high = predictor.predict(mean)
    assert predicted[0] == pytest.approx(-0.48667, abs=1e-5) == predictor.evaluation["noise"]["mean_delta"]
    # ... with the interval -0.4867 + (-0.5088, +0.4165) = [-0.9955, -0.0702]: the whole of it below 0
    assert (low[0], high[0]) == pytest.approx((-0.99547, -0.07016), abs=1e-5) and verdict(low[0], high[0]) == "unlikely to help"
    # One standard deviation more of each statistic adds its coefficient (points of Δ per std): +1 std of the
    # accuracy gap (3.61 points) adds +0.88, of ρ_pos (1.98 points) −0.40, of the share to the teacher +0.13.
    steps = predictor.predict(mean + np.diag(scale))[0] - predicted[0]
    assert steps == pytest.approx([-0.40317, 0.13314, 0.88184, -0.00475], abs=1e-5)
    # A pair by hand: ρ_pos 6%, 60% to the teacher, +2 points of accuracy, spread 0.9
    by_hand = -0.48667 - 0.40317 * (6 - 4.853) / 1.97579 + 0.13314 * (60 - 49.98133) / 25.13442 + 0.88184 * 2 / 3.61182 - 0.00475 * (0.9 - 0.89999) / 0.02839
    assert predictor.predict([6.0, 60.0, 2.0, 0.9])[0][0] == pytest.approx(by_hand, abs=1e-4)
    # Its statistics' averages over the 30 ordered pairs: the accuracy gap is antisymmetric, so its mean is exactly 0.
    assert predictor.mean[2] == 0.0


def test_the_shipped_predictors_stored_evaluation_is_what_docs_scouting_md_reports():
    e = ScoutPredictor.load().evaluation
    text = (Path(__file__).resolve().parents[1] / "docs" / "scouting.md").read_text(encoding="utf-8")
    loso = e["loso"]
    assert f"{loso['spearman']:+.2f} [{loso['low']:+.2f}, {loso['high']:+.2f}], p = {loso['p_value']:.1g}" in text
    assert "| `kl` | {:+.2f} | {:.2f} | {:.2f} | {}/{} |".format(e["noise"]["mean_delta"], e["noise"]["spread"], e["noise"]["noise"], e["noise"]["significant"], e["noise"]["tested"]).replace("-", "−") in text
    assert "| {:+.2f} | {:+.2f} | {:+.2f} | {:+.2f} |".format(e["within_student_mean"], *(e["baselines"][n]["spearman"] for n in ("positive_flips", "teacher_share", "accuracy_gap"))) in text
    test = e["test"]
    assert f"Spearman {test['spearman']:+.2f} [{test['low']:+.2f}, {test['high']:+.2f}] (permutation p = {test['p_value']:.1g}, {test['n']} pairs)" in text
    assert "lomo" not in e  # fitted before that split: docs/scouting.md says its leave-one-model-out score is not known
    assert "leave-one-model-out score is not known" in text


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


class LookupModule(torch.nn.Module):
    """Predicts a fixed class per sample: the input is the sample's index, the output that row of one-hot logits."""

    def __init__(self, predictions, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("table", one_hot_logits(predictions, num_classes))

    def forward(self, x):
        return self.table[x[:, 0].round().long()]


def test_scout_ranks_teachers_by_the_predictors_formula_on_a_case_known_by_hand():
    import ktransfer
    from ktransfer.data.base import ImageData
    from ktransfer.models import Model

    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    data = ImageData(torch.arange(10, dtype=torch.float32).unsqueeze(1), torch.tensor(labels), ["a", "b", "c"], "by-hand")

    def model(name, right):  # right on the samples in ``right``, one class off elsewhere
        return Model(LookupModule([y if i in right else (y + 1) % 3 for i, y in enumerate(labels)]), name)

    student = model("student", range(0, 6))  # 60%: wrong on 6..9
    teachers = {
        "strong": model("strong", range(10)),  # ρ_pos 40 (6..9), ρ_neg 0, gap +40
        "same": model("same", range(4, 10)),  # ρ_pos 40 (6..9), ρ_neg 40 (0..3), gap 0
        "weak": model("weak", range(0, 3)),  # ρ_pos 0, ρ_neg 30 (3..5), gap -30
    }
    # Predicted Δ = -42 + 2·ρ_pos − gap = -42 + ρ_pos + ρ_neg (since gap = ρ_pos − ρ_neg): by hand same +38,
    # strong -2, weak -12 — not the order of the teachers' accuracy. The interval is ±10.
    predictor = ScoutPredictor(
        features=["positive_flips", "teacher_share", "accuracy_gap", "flip_spread"], mean=[0.0] * 4, scale=[1.0] * 4,
        coefficients=[2.0, 0.0, -1.0, 0.0], intercept=-42.0, residual_low=-10.0, residual_high=10.0, method="kl",
    )
    result = ktransfer.scout(student, [teachers["weak"], teachers["strong"], teachers["same"]], data, predictor=predictor)
    assert result.ranking == ["same", "strong", "weak"]
    assert [t.predicted for t in result.teachers] == pytest.approx([38.0, -2.0, -12.0])
    assert [end for t in result.teachers for end in (t.low, t.high)] == pytest.approx([28.0, 48.0, -12.0, 8.0, -22.0, -2.0])
    assert [t.verdict for t in result.teachers] == ["likely to help", "uncertain", "unlikely to help"]
    assert result.unlikely == ["weak"] and all(t.stats.n == 10 for t in result.teachers)


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
    assert "leave-one-student-out Spearman" in result.output
    assert "leave-one-model-out Spearman: not computed (holding out zoo:" in result.output  # 3 models: 2 pairs left
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
