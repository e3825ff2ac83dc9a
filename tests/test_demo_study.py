"""The demo as a study: its options as a study config, one run key (batch size included), seeds pooled per pair, and the processes executor."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ktransfer.cli import main
from ktransfer.demo import DemoOptions, run_demo
from ktransfer.errors import ConfigError, ModelError
from ktransfer.results import read_records
from ktransfer.study import Study, StudyConfig


def test_demo_options_become_a_study_config_that_survives_the_trip_to_a_worker():
    config = DemoOptions(profile="quick", students=["cnn"], teachers=["mlp", "vit"], setting="new-data", guard=True, seeds=[0, 1], controls=False, batch_size=64).study_config()
    assert config.students == ["zoo:cnn"] and config.teachers == ["zoo:mlp", "zoo:vit"] and config.epochs == 2
    assert config.data.setting == "new-data" and config.guard and config.controls == [] and config.batch_size == 64
    assert config.executor == "processes" and config.cpus_per_run == 1
    assert [m.name for m in config.methods] == ["kl", "kl_dp"] and config.lr == pytest.approx(3e-3)
    # a worker rebuilds the config from its dict: the guard and the setting must come along
    again = StudyConfig.from_dict(config.to_dict())
    assert again.guard and again.data.setting == "new-data"
    runs = Study(config, "unused").study_plan({})
    assert len(runs) == 2 * 2 * 2 and all(run.guard and run.batch_size == 64 for run in runs)
    assert all(json.loads(run.data_json)["setting"] == "new-data" for run in runs)
    with pytest.raises(ConfigError, match="unknown executor 'threads'"):
        DemoOptions(executor="threads").resolve()


def test_the_run_key_holds_the_batch_size_the_guard_and_the_setting():
    def key(**options):
        return Study(DemoOptions(profile="quick", students=["cnn"], teachers=["mlp"], methods=["kl"], controls=False, **options).study_config(), "unused").study_plan({})[0].key

    plain = key()
    assert len({plain, key(batch_size=64), key(guard=True), key(setting="new-data")}) == 4
    assert key() == plain  # and the same options give the same key


def test_a_demo_rerun_with_another_batch_size_runs_again(small_fashion_mnist, tiny_zoo, tmp_path):
    options = dict(profile="quick", students=["cnn"], teachers=["mlp"], methods=["kl"], controls=False, epochs=1, out=tmp_path / "demo", data_dir=str(small_fashion_mnist), executor="local")
    first = run_demo(DemoOptions(**options, batch_size=32))
    second = run_demo(DemoOptions(**options, batch_size=16))
    assert first["status"]["phases"]["study"]["done"] == second["status"]["phases"]["study"]["done"] == 1
    (record,) = read_records(tmp_path / "demo" / "results.jsonl")
    assert record["batch_size"] == 16 and record["run_key"] != first["records"][0]["run_key"]
    assert run_demo(DemoOptions(**options, batch_size=16))["records"][0]["run_key"] == record["run_key"]  # the same settings: reused


SETUP = '''
"""Called by every worker process of the processes executor: the tests' small Fashion-MNIST and tiny zoo (as tests/conftest.py sets them)."""


def setup():
    from ktransfer.data import fashion_mnist
    from ktransfer.models import store

    fashion_mnist.EXPECTED_COUNT.update(train=700, test=200)
    fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE = 500, 100, 200
    fashion_mnist._loaded.clear()
    store.DEFAULT_ZOO = {n: store.ZooRecipe(r.arch, r.seed, private_size=200, epochs=1, lr=r.lr, batch_size=64) for n, r in store.DEFAULT_ZOO.items()}
'''

COMPARED = ("acc_before", "acc_after", "delta", "knowledge_gain", "knowledge_loss", "p_value", "delta_vs_control", "delta_vs_self", "p_value_vs_self", "ensemble_delta", "batch_size", "hparams")


def test_the_demo_in_worker_processes_gives_the_records_of_one_process(small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    (tmp_path / "demo_worker_setup.py").write_text(SETUP)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers start with the driver's sys.path
    monkeypatch.setenv("KTRANSFER_WORKER_SETUP", "demo_worker_setup:setup")
    args = ["demo", "--students", "cnn", "--teachers", "mlp", "--methods", "kl_dp", "--seeds", "0,1", "--epochs", "1", "--data-dir", str(small_fashion_mnist)]
    results, outputs = {}, {}
    for executor in ("local", "processes"):
        result = CliRunner().invoke(main, [*args, "--executor", executor, "--out", str(tmp_path / executor)])
        assert result.exit_code == 0, result.output
        outputs[executor] = result.output
        records = read_records(tmp_path / executor / "results.jsonl")
        assert len(records) == 2 + 2 * 2  # 2 seeds of one pair, and the ce and self controls of each seed
        results[executor] = {(r["method"], r["teacher"], r["seed"]): {k: r.get(k) for k in COMPARED} for r in records}
    assert results["processes"] == results["local"]  # the same runs, computed in worker processes: the same numbers
    assert "executor: processes, " in outputs["processes"] and "[6/6]" in outputs["processes"]


def test_the_zoo_trains_in_worker_processes_as_it_does_in_this_one(small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    from ktransfer import pretrain
    from ktransfer.study.executors import worker_pool

    (tmp_path / "demo_worker_setup.py").write_text(SETUP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KTRANSFER_WORKER_SETUP", "demo_worker_setup:setup")
    names = ["mlp", "cnn", "vit"]
    steps, ready = [], []
    pool = worker_pool(2, threads=1)
    try:
        parallel = pretrain.load_zoo(names, small_fashion_mnist, pool, on_step=lambda *step: steps.append(step), on_ready=ready.append)
    finally:
        pool.shutdown()
    assert sorted(ready) == sorted(names) and all(pretrain.is_cached(name, small_fashion_mnist) for name in names)
    assert {name for name, step, total in steps if step == total} == set(names)  # each worker reported its last step
    monkeypatch.setenv("KTRANSFER_CACHE", str(tmp_path / "another-cache"))  # nothing cached: all three train here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker does, so that the rounding is the same
    try:
        here = pretrain.load_zoo(names, small_fashion_mnist, on_ready=ready.append)
    finally:
        torch.set_num_threads(threads)
    assert ready[3:] == names
    for name in names:
        trained_there, trained_here = parallel[name].module.state_dict(), here[name].module.state_dict()
        assert all(torch.equal(trained_there[key], value) for key, value in trained_here.items()), name


def test_a_zoo_model_that_fails_in_a_worker_is_named(small_fashion_mnist, tiny_zoo, tmp_path, monkeypatch):
    from ktransfer import pretrain
    from ktransfer.study.executors import worker_pool

    # The workers do not get the small data set up: the tiny Fashion-MNIST is not the size the real one is.
    pool = worker_pool(2, threads=1, setup="")
    try:
        with pytest.raises(ModelError, match=r"training zoo model '(mlp|cnn)' failed: .*700"):
            pretrain.load_zoo(["mlp", "cnn"], small_fashion_mnist, pool)
    finally:
        pool.shutdown()


def test_the_gain_profile_trains_longer_and_options_override_it():
    gain = DemoOptions(profile="gain").study_config()
    assert (gain.epochs, gain.lr, gain.schedule, len(gain.pairs())) == (30, 0.003, "constant", 30)
    full = DemoOptions().study_config()
    assert (full.epochs, full.lr, full.schedule) == (3, 0.003, "constant")
    assert full.run_settings() == {}  # so the full demo's run keys are those it always had
    mine = DemoOptions(profile="gain", lr=0.01, schedule="cosine", epochs=4).study_config()
    assert (mine.epochs, mine.lr, mine.schedule, mine.run_settings()) == (4, 0.01, "cosine", {"schedule": "cosine"})
