import json
import os
from pathlib import Path
import signal
import sqlite3
import statistics
import subprocess
import sys
import time

import pytest
import torch

import ktransfer.study.executors as study_module  # where the runs call ktransfer.transfer
from ktransfer.errors import ConfigError, TrainingError
from ktransfer.study import DB_FILE, Study, StudyConfig, load_records, load_results, stratified_split


def config_dict(data_dir, **overrides):
    raw = {
        "name": "tiny",
        "students": ["zoo:mlp", "zoo:cnn"],
        "methods": ["kl", "kl_dp"],
        "epochs": 1,
        "lr": 0.01,
        "batch_size": 64,
        "data": {"source": "fashion-mnist", "dir": str(data_dir), "transfer_size": 100, "eval_size": 100},
        "controls": [],  # the controls have a test of their own; the other tests count transfers
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not DEFAULT}


DEFAULT = object()  # an override that leaves the key out, so the config's default applies


def make_study(tmp_path, data_dir, **overrides):
    return Study(StudyConfig.from_dict(config_dict(data_dir, **overrides)), tmp_path / "study")


def db_rows(folder, phase="study"):
    connection = sqlite3.connect(folder / DB_FILE)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute("SELECT * FROM runs WHERE phase = ? ORDER BY created, rowid", (phase,))]
    finally:
        connection.close()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epochs": 0}, "epochs: must be at least 1"),
        ({"epochs": "three"}, "epochs: expected a whole number"),
        ({"colour": "red"}, "unknown key"),
        ({"methods": ["no_such_method"]}, "unknown method 'no_such_method'"),
        ({"methods": [{"name": "kl", "params": {"temperature": -1}}]}, "temperature"),
        ({"methods": [{"name": "kl", "params": {"tau": 1}}]}, "unknown hyperparameter"),
        ({"methods": ["kl", "kl"]}, "listed twice"),
        ({"students": ["cnn"]}, "has no source"),
        ({"students": []}, "'students' is missing"),
        ({"search": {"holdout": 1.5}}, r"search.holdout: must be less than 1(\.0)?; got 1.5"),
        ({"methods": ["kl", {"name": "kl_dp", "lr": -1}]}, r"methods\[1\].lr\[0\]: must be greater than 0"),
        ({"cpus_per_run": 0}, "cpus_per_run: must be greater than 0"),
        ({"executor": "slurm"}, "executor: must be local, processes or ray"),
        ({"data": "imagenet-on-the-moon"}, "unknown data source"),
        ({"targets": "later"}, "must be cached, online or views"),
        ({"controls": ["ce", "teacherless"]}, "controls: unknown control"),
        ({"augment": "heavy"}, "augment: must be none or paper; got 'heavy'"),
        ({"augment": "paper", "targets": "cached"}, "targets: cached teacher outputs are of the un-augmented images"),
    ],
)
def test_config_errors_say_what_to_fix(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig.from_dict(config_dict(tmp_path, **change))


def test_config_grid_pairs_and_yaml_numbers(tmp_path):
    yaml_text = """
students: zoo:*
teachers: [zoo:mlp, zoo:cnn]
methods:
  - kl
  - name: kl_dp
    lr: [1e-3, 1e-2]          # YAML reads 1e-3 as a string; a number is meant
    params: {temperature: [1, 4]}
seeds: [0, 1]
"""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml_text)
    config = StudyConfig.load(path)
    assert config.name == "grid" and len(config.students) == 6
    assert len(config.pairs()) == 6 * 2 - 2  # a model never teaches itself
    assert [m.name for m in config.searched_methods()] == ["kl_dp"]
    settings = config.settings(config.method("kl_dp"))
    assert len(settings) == 4 and {s["lr"] for s in settings} == {1e-3, 1e-2}
    assert config.settings(config.method("kl")) == [{"lr": 1e-4, "params": {}}]  # the paper's default lr
    assert len(config.search_pairs()) == 3 and set(config.search_pairs()) <= set(config.pairs())


def test_augment_key_sets_the_target_default_and_keeps_old_run_keys(tmp_path):
    plain = StudyConfig.from_dict(config_dict(tmp_path))
    assert plain.augment == "none" and plain.targets == "cached" and "augment" not in plain.to_dict()
    run = Study(plain, tmp_path / "s").study_plan({})[0]
    assert "augment" not in run.config()  # keys of studies stored before augmentation existed stay the same
    augmented = StudyConfig.from_dict(config_dict(tmp_path, augment="paper"))
    assert augmented.augment == "paper" and augmented.targets == "online"  # cached would not be exact
    assert StudyConfig.from_dict(augmented.to_dict()).augment == "paper"
    augmented_run = Study(augmented, tmp_path / "s").study_plan({})[0]
    assert augmented_run.config()["augment"] == "paper" and augmented_run.key != run.key and "augment paper" in augmented_run.describe()


def test_stratified_split_keeps_class_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    chosen, rest = stratified_split(labels, 10, seed=3)
    assert len(chosen) == 10 and len(rest) == 90
    assert set(chosen.tolist()).isdisjoint(rest.tolist())
    assert torch.bincount(labels[chosen], minlength=3).tolist() == [5, 3, 2]
    again, _ = stratified_split(labels, 10, seed=3)
    assert torch.equal(chosen, again)


# ---------------------------------------------------------------- running


def test_study_runs_every_combination_and_resumes_without_repeating(small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    study = make_study(tmp_path, small_fashion_mnist)
    status = study.run(log=lambda line: None)
    assert status["phases"]["study"] == {"pending": 0, "running": 0, "done": 4, "failed": 0, "planned": 4}
    rows = db_rows(study.folder)
    assert sorted((r["student"], r["teacher"], r["method"]) for r in rows) == sorted(
        (s, t, m) for s, t in [("zoo:mlp", "zoo:cnn"), ("zoo:cnn", "zoo:mlp")] for m in ("kl", "kl_dp")
    )
    for row in rows:
        record, config = json.loads(row["record"]), json.loads(row["config"])
        assert record["delta"] == pytest.approx(record["knowledge_gain"] - record["knowledge_loss"], abs=1e-9)
        assert len(record["history"]) == 1 and record["n_eval"] == 100 and record["n_transfer"] == 100
        assert record["ensemble_delta"] == pytest.approx(record["ensemble_acc"] - record["acc_before"]) and record["oracle_acc"] >= record["acc_before"]
        assert config["lr"] == 0.01 and config["epochs"] == 1 and config["data"]["source"] == "fashion-mnist"
    # Everything the report reads is there.
    for name in ("results.jsonl", "results.csv", "zoo.json", "complementarity.json", "study.yaml"):
        assert (study.folder / name).exists(), name
    records = load_records(study.folder)
    frame = load_results(study.folder)
    assert len(frame) == 4 and list(frame["delta"]) == [r["delta"] for r in records]
    assert set(frame["hparam_temperature"]) == {1.0}
    assert (study.folder / "results.csv").read_text().count("\n") == 5
    header = (study.folder / "results.csv").read_text().splitlines()[0].split(",")
    assert header.index("ensemble_delta") < header.index("n_eval") and "capture" in header  # among the leading columns

    calls = []
    monkeypatch.setattr(study_module, "transfer", lambda *a, **k: calls.append(1))
    again = Study.open(study.folder)  # a study folder holds its own config
    again.run(log=lambda line: None)
    assert calls == [] and len(db_rows(study.folder)) == 4


def test_controls_run_once_per_student_and_setting_and_every_transfer_is_compared_with_them(small_fashion_mnist, tiny_zoo, tmp_path):
    study = make_study(tmp_path, small_fashion_mnist, controls=DEFAULT, methods=["kl", {"name": "kl_dp", "lr": 0.02}], students=["zoo:mlp", "zoo:cnn"], teachers=["zoo:cnn"])
    assert study.config.controls == ["ce", "self"]  # the default
    study.run(log=lambda line: None)
    records = load_records(study.folder)
    controls = [r for r in records if r.get("control")]
    # one per student (only mlp has a teacher other than itself) and learning rate: 2 lrs x 2 controls
    assert sorted((r["student"], r["method"], r["lr"]) for r in controls) == [("zoo:mlp", c, lr) for c in ("ce", "self") for lr in (0.01, 0.02)]
    assert all(r["teacher"] is None for r in controls)
    for r in (r for r in records if not r.get("control")):
        ce = next(c for c in controls if c["method"] == "ce" and c["lr"] == r["lr"])
        assert r["control_delta"] == ce["delta"] and r["delta_vs_control"] == pytest.approx(r["acc_after"] - ce["acc_after"])
        assert 0 <= r["p_value_vs_control"] <= 1 and "delta_vs_self" in r
    frame = load_results(study.folder)
    assert sorted(frame["control"].tolist()) == [False] * 2 + [True] * 4
    # --no-controls (controls: []) plans no control run
    assert not any(run.control for run in make_study(tmp_path / "none", small_fashion_mnist).study_plan({}))


def test_augmented_study_runs(small_fashion_mnist, tiny_zoo, tmp_path):
    study = make_study(tmp_path, small_fashion_mnist, methods=["kl_dp"], augment="paper")
    assert study.run(log=lambda line: None)["phases"]["study"]["done"] == 2
    for record in load_records(study.folder):
        assert record["augment"] == "paper" and record["targets"] == "online" and 0 <= record["p_value"] <= 1
    assert "augment: paper" in (study.folder / "study.yaml").read_text()


def test_augmented_study_with_views_caches_each_frozen_model_once(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.predictions import PredictionCache

    study = make_study(tmp_path, small_fashion_mnist, methods=["kl", "kl_dp"], augment="paper", targets="views")
    assert study.run(log=lambda line: None)["phases"]["study"]["done"] == 4
    records = load_records(study.folder)
    assert {r["targets"] for r in records} == {"views"}
    # two models, each a teacher and an original student: two caches, one epoch each, read by all four runs
    folders = sorted((PredictionCache().root / "views").glob("*/epoch-*"))
    assert len(folders) == 2 and all(set(r["view_cache"]["keys"]) <= {f.parent.name for f in folders} for r in records)


def test_a_failing_run_is_recorded_and_the_study_goes_on(small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    real_transfer = study_module.transfer

    def diverging(student, teacher, transfer_data, eval_data, method, *args, **kwargs):
        if student.spec == "zoo:cnn" and method == "kl":
            raise TrainingError("kl: the loss became nan at epoch 1, step 2; lower the learning rate")
        return real_transfer(student, teacher, transfer_data, eval_data, method, *args, **kwargs)

    monkeypatch.setattr(study_module, "transfer", diverging)
    study = make_study(tmp_path, small_fashion_mnist)
    status = study.run(log=lambda line: None)
    assert status["phases"]["study"]["done"] == 3 and status["phases"]["study"]["failed"] == 1
    (failure,) = status["failed_runs"]
    assert failure["student"] == "zoo:cnn" and failure["method"] == "kl" and "TrainingError: kl: the loss became nan" in failure["error"]
    assert len(load_results(study.folder)) == 3
    with_failed = load_results(study.folder, include_failed=True)
    assert list(with_failed["status"]).count("failed") == 1

    study.run(log=lambda line: None)  # failed runs stay failed unless asked
    assert study.status()["phases"]["study"]["failed"] == 1
    monkeypatch.setattr(study_module, "transfer", real_transfer)
    status = study.run(retry_failed=True, log=lambda line: None)
    assert status["phases"]["study"]["done"] == 4 and status["failed_runs"] == []
    retried = [r for r in db_rows(study.folder) if r["student"] == "zoo:cnn" and r["method"] == "kl"]
    assert retried[0]["attempts"] == 2 and retried[0]["error"] is None


def test_a_real_nan_loss_fails_its_run_only(small_fashion_mnist, tiny_zoo, tmp_path):
    study = make_study(tmp_path, small_fashion_mnist, methods=[{"name": "kl", "lr": 1e30}, "ce"])
    status = study.run(log=lambda line: None)
    failed = {(f["student"], f["method"]) for f in status["failed_runs"]}
    assert failed == {("zoo:mlp", "kl"), ("zoo:cnn", "kl")}
    assert all("TrainingError" in f["error"] and "lower the learning rate" in f["error"] for f in status["failed_runs"])
    assert status["phases"]["study"]["done"] == 2


def test_search_uses_held_out_transfer_data_and_picks_the_best_mean_delta(small_fashion_mnist, tiny_zoo, tmp_path):
    study = make_study(
        tmp_path, small_fashion_mnist, methods=[{"name": "kl_dp", "lr": [0.001, 0.05]}], search={"pairs": 2, "holdout": 0.25, "seed": 1},
    )
    study.run(log=lambda line: None)
    search_rows = db_rows(study.folder, "search")
    assert len(search_rows) == 4 and all(r["status"] == "done" for r in search_rows)
    by_lr = {}
    for row in search_rows:
        record = json.loads(row["record"])
        # Scored on 25% of the 100 transfer images, trained on the rest; the evaluation set is never touched.
        assert record["n_eval"] == 25 and record["n_transfer"] == 75
        assert "held-out" in record["eval_data"] and "test" not in record["eval_data"]
        by_lr.setdefault(record["lr"], []).append(record["delta"])
    best = max(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), -lr))  # ties go to the first in the grid
    study_rows = [json.loads(r["record"]) for r in db_rows(study.folder) if r["method"] == "kl_dp"]
    assert len(study_rows) == 2 and {r["lr"] for r in study_rows} == {best}
    assert all(r["n_eval"] == 100 for r in study_rows)
    saved = json.loads((study.folder / "search.json").read_text())
    assert [s["setting"]["lr"] for s in saved["methods"]["kl_dp"] if s["chosen"]] == [best]


def test_a_search_whose_held_out_data_overlaps_the_evaluation_set_is_refused(tmp_path, monkeypatch):
    """The search chooses its setting on held-out transfer data: if that is evaluation data, by any spelling, the study stops before any run."""
    from folder_helpers import write_image_folder

    from ktransfer.data.base import ImageData
    from ktransfer.errors import DataError
    from ktransfer.study import DATA_SOURCES

    root = tmp_path / "imgs"
    write_image_folder(root / "train", per_class=5)
    write_image_folder(tmp_path / "extra", per_class=1, seed=1)
    for train_class in (root / "train").iterdir():  # the "evaluation" folder: every training image (linked) and one more per class
        (root / "val" / train_class.name).mkdir(parents=True)
        for image in [*train_class.iterdir(), *(tmp_path / "extra" / train_class.name).iterdir()]:
            (root / "val" / train_class.name / f"{image.parent.parent.name}_{image.name}").symlink_to(image)
    searched = {"methods": [{"name": "kl_dp", "lr": [0.001, 0.01]}], "search": {"pairs": 1, "holdout": 0.2}}
    study = make_study(tmp_path / "a", None, data={"source": f"folder:{root}"}, **searched)
    with pytest.raises(DataError, match=r"search would choose on evaluation samples") as refused:
        study.run(log=lambda line: None)
    assert "shares" in str(refused.value) or "lies inside" in str(refused.value)
    assert "fashion-mnist:validation" in str(refused.value)
    assert load_records(study.folder) == []

    # A registered source whose evaluation set is a copy of its transfer set, in another order: refused alike.
    images = torch.randint(0, 256, (60, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    names = [f"c{i}" for i in range(10)]

    def leaky(config):
        transfer = ImageData(images, torch.arange(60) % 10, names, "leaky/transfer")
        return transfer, ImageData(images.flip(0).clone(), (torch.arange(60) % 10).flip(0), names, "leaky/eval")

    monkeypatch.setitem(DATA_SOURCES, "leaky", leaky)
    study = make_study(tmp_path / "b", None, data={"source": "leaky"}, **searched)
    with pytest.raises(DataError, match=r"leaky/transfer\[held-out\] lies inside the evaluation data leaky/eval.*search would choose on evaluation samples"):
        study.run(log=lambda line: None)


def test_load_results_reads_a_demo_folder(tmp_path):
    from ktransfer.results import append_record

    folder = tmp_path / "demo"
    for delta in (1.5, -0.5):
        append_record(folder / "results.jsonl", {"student": "zoo:cnn", "teacher": "zoo:mlp", "method": "kl", "delta": delta, "hparams": {"temperature": 1.0}, "history": [{"epoch": 1}]})
    frame = load_results(folder)
    assert list(frame["delta"]) == [1.5, -0.5] and "history" not in frame.columns and list(frame["hparam_temperature"]) == [1.0, 1.0]


def test_yaml_config_without_pyyaml_names_the_extra(tmp_path, monkeypatch):
    from ktransfer.extras import MissingExtraError

    (tmp_path / "s.yaml").write_text("students: [zoo:cnn, zoo:mlp]\nmethods: [kl]\n")
    (tmp_path / "s.json").write_text(json.dumps({"students": ["zoo:cnn", "zoo:mlp"], "methods": ["kl"]}))
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'ktransfer\[study\]'"):
        StudyConfig.load(tmp_path / "s.yaml")
    assert StudyConfig.load(tmp_path / "s.json").name == "s"  # JSON needs nothing extra


def test_one_process_per_study_folder(tmp_path):
    from ktransfer.study.store import StudyError, _exclusive

    study = make_study(tmp_path, tmp_path)
    study.folder.mkdir()
    with _exclusive(study.folder):
        with pytest.raises(StudyError, match="another process is running the study"):
            study.run(log=lambda line: None)
        assert study.status()["active"] is True
    assert study.status()["active"] is False


# ---------------------------------------------------------------- a real kill

LAUNCHER = """
import sys, time
from ktransfer.data import fashion_mnist
fashion_mnist.EXPECTED_COUNT.update(train=700, test=200)  # the test's small Fashion-MNIST look-alike
fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE = 500, 100, 200
from ktransfer.models import store
store.DEFAULT_ZOO = {n: store.ZooRecipe(r.arch, r.seed, private_size=200, epochs=1, lr=r.lr, batch_size=64) for n, r in store.DEFAULT_ZOO.items()}
import ktransfer.study.executors as study
pace = float(sys.argv[1])
if pace:  # hold each run open a moment so the kill lands in the middle of the study
    real = study.transfer
    def paced(*args, **kwargs):
        result = real(*args, **kwargs)
        time.sleep(pace)
        return result
    study.transfer = paced
from ktransfer.cli import main
main(sys.argv[2:], prog_name="ktransfer")
"""


def _done_count(db) -> int:
    if not db.exists():
        return 0
    try:
        connection = sqlite3.connect(db, timeout=1)
        try:
            return connection.execute("SELECT COUNT(*) FROM runs WHERE phase = 'study' AND status = 'done'").fetchone()[0]
        finally:
            connection.close()
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def test_killed_study_resumes_with_no_duplicated_and_no_lost_runs(small_fashion_mnist, tmp_path):
    config = tmp_path / "kill.json"
    config.write_text(json.dumps(config_dict(small_fashion_mnist, name="kill")))
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    folder = tmp_path / "kill"
    command = [sys.executable, str(launcher)]
    args = ["study", str(config), "--out", str(folder)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    process = subprocess.Popen([*command, "0.5", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while _done_count(folder / DB_FILE) < 2:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the study did not finish two runs within a minute"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {r["key"]: r for r in db_rows(folder)}
    finished_before = {k: r for k, r in before.items() if r["status"] == "done"}
    assert 2 <= len(finished_before) < 4
    assert any(r["status"] != "done" for r in before.values())

    rerun = subprocess.run([*command, "0", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    after = db_rows(folder)
    expected = {(s, t, m) for s, t in (("zoo:mlp", "zoo:cnn"), ("zoo:cnn", "zoo:mlp")) for m in ("kl", "kl_dp")}
    assert len(after) == 4 and {(r["student"], r["teacher"], r["method"]) for r in after} == expected
    assert all(r["status"] == "done" for r in after)
    for row in after:
        if row["key"] in finished_before:  # finished before the kill: kept, not run again
            assert row["attempts"] == 1 and row["finished"] == finished_before[row["key"]]["finished"]
            assert row["record"] == finished_before[row["key"]]["record"]
    interrupted = [k for k, r in before.items() if r["status"] == "running"]
    assert all(next(r for r in after if r["key"] == k)["attempts"] == 2 for k in interrupted)
    if interrupted:
        assert "redoing interrupted run" in rerun.stdout
    lines = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and len({line["run_key"] for line in lines}) == 4
    assert {(line["student"], line["teacher"], line["method"]) for line in lines} == expected


def test_prediction_cache_writers_never_share_a_temporary_file(tmp_path, monkeypatch, tiny_data):
    # A study's parallel workers may compute the same teacher's logits at once: each writes a file
    # of its own and renames it into place, so the entry is always one writer's whole file.
    import ktransfer.predictions as predictions
    from ktransfer.models.base import Model
    from ktransfer.models.zoo import ZOO_ARCHITECTURES

    torch.manual_seed(0)
    model = Model(ZOO_ARCHITECTURES["mlp"][1](), "mlp", family="mlp")
    written = []
    real_save = predictions.save_file
    monkeypatch.setattr(predictions, "save_file", lambda tensors, path: (written.append(Path(path)), real_save(tensors, path))[1])
    first, second = predictions.PredictionCache(tmp_path), predictions.PredictionCache(tmp_path)
    logits = first.logits(model, tiny_data[1])
    (tmp_path / f"{first.key(model, tiny_data[1])}.safetensors").unlink()  # the second writer finds no entry either
    again = second.logits(model, tiny_data[1])
    assert len(written) == 2 and written[0] != written[1] and all(str(os.getpid()) in p.name for p in written)
    assert torch.equal(logits, again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{first.key(model, tiny_data[1])}.safetensors"]  # no temporary file left


def test_the_guard_never_selects_on_the_evaluation_data(small_fashion_mnist):
    def load(**data):
        config = StudyConfig.from_dict({"students": ["zoo:cnn", "zoo:mlp"], "methods": ["kl"], "guard": True, "data": {"dir": str(small_fashion_mnist), **data}})
        return config.data.load(guard=config.guard)

    with pytest.raises(ConfigError, match="the guard selects on fashion-mnist/validation, which is also the evaluation data"):
        load(source="fashion-mnist:validation")
    with pytest.raises(ConfigError, match="the transfer data fashion-mnist/validation is the evaluation data"):
        load(source="fashion-mnist:validation", setting="new-data")
    paper = load()
    assert paper.validation.name == "fashion-mnist/validation" and paper.eval.name == "fashion-mnist/test"
    new_data = load(setting="new-data")  # the students train on the validation split: the guard holds out a share instead
    assert new_data.transfer.name == "fashion-mnist/validation" and new_data.validation is None
