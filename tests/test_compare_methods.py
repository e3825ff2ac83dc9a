"""Two methods of a study head to head (ktransfer.study.compare_methods, `ktransfer study FOLDER --compare`)."""

import re
import statistics

import pytest
from click.testing import CliRunner

from ktransfer.cli import main
from ktransfer.controls import load_predictions
from ktransfer.errors import DataError
from ktransfer.significance import mcnemar_p_value
from ktransfer.study import LABELS_KEY, PREDICTIONS_DIR, Study, StudyConfig, compare_methods, load_records


@pytest.fixture
def two_method_study(small_fashion_mnist, tiny_zoo, tmp_path):
    config = {
        "name": "versus", "students": ["zoo:mlp", "zoo:cnn"], "teachers": ["zoo:cnn", "zoo:vit"], "methods": ["kl", "kl_dp"],
        "seeds": [0, 1], "epochs": 1, "lr": 0.05, "batch_size": 64,
        "data": {"source": "fashion-mnist", "dir": str(small_fashion_mnist), "transfer_size": 100, "eval_size": 100},
    }
    study = Study(StudyConfig.from_dict(config), tmp_path / "study")
    study.run(log=lambda line: None)
    return study.folder


def test_compare_methods_counts_pairs_over_seeds_and_images_over_runs(two_method_study):
    folder = two_method_study
    records = [r for r in load_records(folder) if not r.get("control")]
    labels = load_predictions(folder / PREDICTIONS_DIR, LABELS_KEY)
    run = {(r["method"], r["student"], r["teacher"], r["seed"]): r for r in records}
    pairs = sorted({(r["student"], r["teacher"]) for r in records})
    assert len(pairs) == 3  # cnn is no teacher of itself

    # by hand: a pair's difference is its mean over the two seeds; images count once per run
    expected = {pair: statistics.fmean(run[("kl", *pair, s)]["acc_after"] - run[("kl_dp", *pair, s)]["acc_after"] for s in (0, 1)) for pair in pairs}
    only_kl = only_dp = 0
    for pair in pairs:
        for seed in (0, 1):
            right_kl = load_predictions(folder / PREDICTIONS_DIR, run[("kl", *pair, seed)]["run_key"]) == labels
            right_dp = load_predictions(folder / PREDICTIONS_DIR, run[("kl_dp", *pair, seed)]["run_key"]) == labels
            only_kl += int((right_kl & ~right_dp).sum())
            only_dp += int((~right_kl & right_dp).sum())

    result = compare_methods(folder, "kl", "kl_dp")
    assert (result["pairs"], result["runs"]) == (3, 6)
    assert {(p["student"], p["teacher"]): p["difference"] for p in result["by_pair"]} == pytest.approx(expected)
    assert all(p["seeds"] == 2 for p in result["by_pair"])
    ahead = sum(d > 0 for d in expected.values())
    behind = sum(d < 0 for d in expected.values())
    assert (result["ahead"], result["behind"], result["level"]) == (ahead, behind, 3 - ahead - behind)
    assert result["mean_difference"] == pytest.approx(statistics.fmean(expected.values()))
    assert result["sign_test_p"] == mcnemar_p_value(ahead, behind)
    assert (result["only_method"], result["only_reference"]) == (only_kl, only_dp)
    assert result["mcnemar_p"] == mcnemar_p_value(only_kl, only_dp)
    # swapping the two mirrors every count
    swapped = compare_methods(folder, "kl_dp", "kl")
    assert (swapped["ahead"], swapped["behind"], swapped["only_method"], swapped["only_reference"]) == (behind, ahead, only_dp, only_kl)
    assert swapped["mean_difference"] == pytest.approx(-result["mean_difference"])

    # the command line prints the same counts
    printed = CliRunner().invoke(main, ["study", str(folder), "--compare", "kl,kl_dp"], terminal_width=200)
    assert printed.exit_code == 0, printed.output
    assert f"kl is ahead of kl_dp in {ahead} of 3 pairs, behind in {behind}" in printed.output
    assert f"{only_kl:,} images are right only after kl and {only_dp:,} only after kl_dp" in printed.output
    # one row per pair, teacher before student as in the demo's transfers table
    for (student, teacher), difference in expected.items():
        row = rf"│ {teacher.removeprefix('zoo:')}\s*│ {student.removeprefix('zoo:')}\s*│\s*\d+ │\s*{re.escape(f'{difference:+.2f}')} │"
        assert re.search(row, printed.output), (row, printed.output)


def test_compare_methods_says_what_is_wrong(two_method_study):
    with pytest.raises(DataError, match=r"no finished run of 'kl_dp_soft'; its methods are kl, kl_dp"):
        compare_methods(two_method_study, "kl_dp_soft", "kl_dp")
    with pytest.raises(DataError, match="two different methods"):
        compare_methods(two_method_study, "kl", "kl")
    printed = CliRunner().invoke(main, ["study", str(two_method_study), "--compare", "kl"])
    assert printed.exit_code == 2 and "give two method names" in printed.output
