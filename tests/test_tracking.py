"""Experiment tracking: what a transfer and a study send to TensorBoard, MLflow, W&B and Trackio, read back."""

import json
import sqlite3

import mlflow
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ktransfer
from ktransfer.cli import main
from ktransfer.errors import ConfigError
from ktransfer.models.zoo import MLP
from ktransfer.study import Study, StudyConfig, load_records
from ktransfer.tracking import READ_EVERY, Tracker, Tracking, numbers

from test_study import config_dict


def models():
    torch.manual_seed(0)
    return MLP(hidden=16), MLP(hidden=16)


def events(folder):
    """Every TensorBoard scalar under ``folder``: {run folder name: {tag: [(step, value)]}}."""
    runs = {}
    for path in sorted(folder.iterdir()):
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        runs[path.name] = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    return runs


def mlflow_runs(folder):
    client = mlflow.MlflowClient((folder / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("ktransfer")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(autouse=True)
def local_trackers(monkeypatch, tmp_path):
    """No tracker reaches a server: MLflow's store and W&B's mode are the local defaults, Trackio writes into tmp_path."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc: W&B goes offline
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))


def test_a_transfer_logs_steps_epochs_settings_and_record_to_tensorboard_and_mlflow(tiny_data, tmp_path):
    transfer_set, eval_set = tiny_data
    result = ktransfer.transfer(*models(), transfer_set, eval_set, "kl_dp", epochs=2, lr=0.01, batch_size=64, loggers=["tensorboard", "mlflow"], tracking_dir=tmp_path)
    steps = 2 * 6  # 384 images in batches of 64

    (run,) = events(tmp_path / "tensorboard").values()
    assert [step for step, _ in run["train/loss"]] == list(range(1, steps + 1))
    assert [step for step, _ in run["train/teacher_share"]] == list(range(1, steps + 1))
    for key in ("acc_after", "delta", "knowledge_gain", "train_loss"):
        assert [value for _, value in run[f"epoch/{key}"]] == pytest.approx([record[key] for record in result.history], abs=1e-6)
    assert [step for step, _ in run["epoch/delta"]] == [6, 12]
    assert run["final/delta"] == [(steps, pytest.approx(result.metrics["delta"]))]
    # The mean of an epoch's logged step losses is the epoch's train_loss.
    first = [value for step, value in run["train/loss"] if step <= 6]
    assert sum(first) / 6 == pytest.approx(result.history[0]["train_loss"], rel=1e-5)

    client, (mlrun,) = mlflow_runs(tmp_path)
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["method"] == "kl_dp" and mlrun.data.params["epochs"] == "2" and json.loads(mlrun.data.params["lr"]) == 0.01
    assert mlrun.data.tags["method"] == "kl_dp" and mlrun.data.tags["student"] == "student"
    history = client.get_metric_history(mlrun.info.run_id, "epoch/acc_after")
    assert [(m.step, m.value) for m in history] == [(6, pytest.approx(result.history[0]["acc_after"])), (12, pytest.approx(result.history[1]["acc_after"]))]
    assert mlrun.data.metrics["final/acc_after"] == pytest.approx(result.metrics["acc_after"])
    assert len(client.get_metric_history(mlrun.info.run_id, "train/loss")) == steps


def test_wandb_offline_writes_its_run_folder_and_trackio_its_database(tiny_data, tmp_path):
    transfer_set, eval_set = tiny_data
    result = ktransfer.transfer(*models(), transfer_set, eval_set, "kl", epochs=1, lr=0.01, batch_size=64, loggers=["wandb", "trackio"], tracking_dir=tmp_path)
    (run_folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_folder.glob("run-*.wandb")) and (run_folder / "files").is_dir()
    (database,) = (tmp_path / "trackio").glob("ktransfer*.db")
    with sqlite3.connect(database) as connection:
        rows = [json.loads(metrics) for (metrics,) in connection.execute("select metrics from metrics")]
    assert any(row.get("final/delta") == pytest.approx(result.metrics["delta"]) for row in rows)
    assert sum("train/loss" in row for row in rows) == 6


class Broken(Tracker):
    name = "broken"

    def __init__(self, fail_at):
        self.fail_at, self.calls = fail_at, []

    def start(self, run_name, settings, tags):
        self.calls.append("start")
        if self.fail_at == "start":
            raise RuntimeError("server down")

    def log(self, values, step):
        self.calls.append("log")
        if self.fail_at == "log":
            raise OSError("disk full")

    def finish(self, final, step, failed=False):
        self.calls.append("finish")


@pytest.mark.parametrize("fail_at", ["start", "log"])
def test_a_failing_tracker_is_one_warning_and_the_run_and_the_other_trackers_go_on(tiny_data, tmp_path, fail_at):
    transfer_set, eval_set = tiny_data
    broken, lines = Broken(fail_at), []
    result = ktransfer.transfer(*models(), transfer_set, eval_set, "kl", epochs=1, lr=0.01, batch_size=64, loggers=[broken, "tensorboard"], tracking_dir=tmp_path, log=lines.append)
    warnings = [line for line in lines if "broken tracker failed" in line]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0]
    assert broken.calls.count(fail_at) == 1 and "finish" not in broken.calls
    assert "acc_after" in result.metrics
    (run,) = events(tmp_path / "tensorboard").values()
    assert run["final/acc_after"][0][1] == pytest.approx(result.metrics["acc_after"])


def test_a_run_that_fails_is_closed_as_failed(tiny_data, tmp_path):
    transfer_set, eval_set = tiny_data
    with pytest.raises(ConfigError):
        ktransfer.transfer(*models(), transfer_set, eval_set, "kl", epochs=1, lr=0.01, loggers=["mlflow"], tracking_dir=tmp_path, augment="paper", targets="cached")
    assert not (tmp_path / "mlruns").exists()  # refused before any tracker started: nothing written
    method = ktransfer.create_method("kl")
    method.loss = lambda inputs: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        ktransfer.transfer(*models(), transfer_set, eval_set, method, epochs=1, lr=0.01, batch_size=64, loggers=["mlflow"], tracking_dir=tmp_path)
    _, (mlrun,) = mlflow_runs(tmp_path)
    assert mlrun.info.status == "FAILED"


def test_unknown_tracker_names_are_refused_with_the_choices(tiny_data, tmp_path):
    transfer_set, eval_set = tiny_data
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'; use tensorboard, mlflow, wandb, trackio"):
        ktransfer.transfer(*models(), transfer_set, eval_set, "kl", epochs=1, lr=0.01, loggers=["tensorbord"], tracking_dir=tmp_path)


def test_step_values_are_read_back_in_batches():
    class Memory(Tracker):
        name = "memory"

        def __init__(self):
            self.logged = []

        def start(self, *args):
            pass

        def log(self, values, step):
            self.logged.append(step)

        def finish(self, *args):
            pass

    class Out:
        def __init__(self, value):
            self.loss, self.stats = torch.tensor(value), {"share": 0.5}

    class State:
        step = 0

    class FakeEngine:
        state = State()

    memory = Memory()
    tracking = Tracking([memory], print)
    engine = FakeEngine()
    for step in range(1, READ_EVERY):
        engine.state.step = step
        tracking.on_step_end(engine, Out(float(step)))
    assert memory.logged == []  # nothing read back yet
    engine.state.step = READ_EVERY
    tracking.on_step_end(engine, Out(1.0))
    assert memory.logged == list(range(1, READ_EVERY + 1))
    assert numbers({"a": 1, "b": True, "c": "x", "d": float("nan"), "e": 2.5}, "p") == {"p/a": 1.0, "p/e": 2.5}


def test_a_study_logs_every_run_with_its_settings_as_tags(small_fashion_mnist, tiny_zoo, tmp_path):
    config = StudyConfig.from_dict(config_dict(small_fashion_mnist, methods=["kl_dp"], log=["tensorboard", "mlflow"]))
    study = Study(config, tmp_path / "study")
    study.run(log=lambda line: None)
    records = load_records(study.folder)
    assert len(records) == 2
    runs = events(study.folder / "tensorboard")
    assert len(runs) == 2
    client, mlruns = mlflow_runs(study.folder)
    assert len(mlruns) == 2 and {run.data.tags["study"] for run in mlruns} == {"tiny"}
    for record in records:
        (mlrun,) = [run for run in mlruns if run.data.tags["student"] == record["student"]]
        assert mlrun.data.tags["phase"] == "study" and mlrun.data.params["epochs"] == "1"
        assert mlrun.data.metrics["final/delta"] == pytest.approx(record["delta"])
    with pytest.raises(ConfigError, match="log"):
        StudyConfig.from_dict(config_dict(small_fashion_mnist, log=["tensorbord"]))


def test_cli_log_option_writes_into_out(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "out"
    args = ["transfer", "--student", "zoo:mlp", "--teacher", "zoo:cnn", "--epochs", "1", "--lr", "0.01", "--batch-size", "64", "--out", str(out),
            "--data-dir", str(small_fashion_mnist), "--log", "tensorboard", "--controls"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    runs = events(out / "tensorboard")
    assert sorted(name.split("-zoo_mlp")[0] for name in runs) == ["ce", "kl_dp", "self"]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    transfer_record = next(r for r in records if r["method"] == "kl_dp" and not r.get("control"))
    (kl_dp,) = [run for name, run in runs.items() if name.startswith("kl_dp")]
    assert kl_dp["final/delta"][0][1] == pytest.approx(transfer_record["delta"])
    refused = CliRunner().invoke(main, [*args[:-1], "--teacher", "zoo:resnet", "--strategy", "parallel"])
    assert refused.exit_code != 0 and "--log sends a single transfer" in refused.output
