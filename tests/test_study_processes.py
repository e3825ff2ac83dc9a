"""The processes executor: a study's runs in spawned worker processes give the records of one process, and a dying worker is retried, then recorded."""

from __future__ import annotations

import os

import pytest

from folder_helpers import write_split_folder
from ktransfer.errors import ConfigError
from ktransfer.study import Study, StudyConfig, load_records
from ktransfer.study.executors import ProcessExecutor, usable_cpus

COMPARED = ("student", "teacher", "method", "seed", "acc_before", "acc_after", "delta", "knowledge_gain", "knowledge_loss", "hparams", "control")


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    return write_split_folder(tmp_path_factory.mktemp("process-study") / "images", train_per_class=10, val_per_class=6)


def config(folder_data, **overrides) -> dict:
    raw = {
        "name": "processes", "students": ["study_process_models:small_net?width=16&seed=1&input_size=32", "study_process_models:small_net?width=24&seed=2&input_size=32"],
        "methods": ["kl", "kl_dp"], "epochs": 1, "lr": 0.01, "batch_size": 8, "seeds": [0, 1],
        "data": {"source": f"folder:{folder_data}"}, "controls": ["ce"],
    }
    return {**raw, **overrides}


def by_run(records: list[dict]) -> dict:
    return {(r["student"], r["teacher"], r["method"], r["seed"]): {k: r.get(k) for k in COMPARED} for r in records}


def test_processes_give_the_records_of_one_process(folder_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANSFER_CACHE", str(tmp_path / "cache"))
    local = Study(StudyConfig.from_dict(config(folder_data)), tmp_path / "local")
    local.run(log=lambda line: None)
    parallel = Study(StudyConfig.from_dict(config(folder_data, executor="processes")), tmp_path / "parallel")
    lines = []
    status = parallel.run(log=lines.append)
    assert status["phases"]["study"]["done"] == status["phases"]["study"]["planned"] == 2 * 2 * 2 + 2 * 2  # pairs × methods × seeds + controls
    assert any(line.startswith("executor: processes, ") for line in lines)
    expected, got = by_run(load_records(tmp_path / "local")), by_run(load_records(tmp_path / "parallel"))
    assert got.keys() == expected.keys()
    for key in expected:  # the same runs, computed in other processes: the same numbers
        assert got[key] == expected[key], key


def test_workers_fit_the_cpus(folder_data):
    one = ProcessExecutor(StudyConfig.from_dict(config(folder_data, cpus_per_run=1)), "cpu")
    two = ProcessExecutor(StudyConfig.from_dict(config(folder_data, cpus_per_run=2)), "cpu")
    try:
        assert one.slots() == usable_cpus() and two.slots() == max(1, usable_cpus() // 2)
    finally:
        one.close()
        two.close()


def test_a_run_whose_worker_dies_is_retried_then_recorded_failed(folder_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KTRANSFER_TEST_PARENT", str(os.getpid()))  # the driver builds the model; every worker that tries dies
    raw = config(folder_data, executor="processes", max_retries=1, seeds=[0], methods=["kl"], controls=[])
    raw["students"] = ["study_process_models:dies_in_worker?width=16&seed=1&input_size=32", "study_process_models:small_net?width=24&seed=2&input_size=32"]
    raw["teachers"] = ["study_process_models:small_net?width=32&seed=3&input_size=32"]
    study = Study(StudyConfig.from_dict(raw), tmp_path / "dying")
    status = study.run(log=lambda line: None)
    study_phase = status["phases"]["study"]
    # the run whose student kills its worker fails after 1 + 1 tries; the other run, though it shared the dead pool, is done
    assert study_phase["done"] == 1 and study_phase["failed"] == 1
    [failed] = status["failed_runs"]
    assert "dies_in_worker" in failed["student"] and "worker process died (tried 2 times)" in failed["error"]


def test_a_study_runs_on_a_hugging_face_dataset_as_on_the_folder_it_was_read_from(folder_data, tmp_path, monkeypatch):
    monkeypatch.setenv("KTRANSFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    saved = tmp_path / "saved"
    datasets.load_dataset("imagefolder", data_dir=str(folder_data), cache_dir=str(tmp_path / "hf-cache")).save_to_disk(str(saved))
    one_run = dict(methods=["kl_dp"], seeds=[0], controls=[])
    folder = Study(StudyConfig.from_dict(config(folder_data, **one_run)), tmp_path / "folder")
    folder.run(log=lambda line: None)
    hf = Study(StudyConfig.from_dict(config(folder_data, **one_run, data={"source": f"hf-disk:{saved}"})), tmp_path / "hf")
    hf.run(log=lambda line: None)
    from_folder, from_hf = load_records(folder.folder), load_records(hf.folder)
    assert len(from_hf) == len(from_folder) == 2
    for a, b in zip(sorted(from_folder, key=lambda r: r["student"]), sorted(from_hf, key=lambda r: r["student"])):
        assert (a["n_transfer"], a["n_eval"], a["student"]) == (b["n_transfer"], b["n_eval"], b["student"])
        assert b["transfer_data"].startswith("hf-disk:")
    with pytest.raises(ConfigError, match="hf-disk:PATH or hf-imagefolder:PATH"):
        StudyConfig.from_dict(config(folder_data, data={"source": "hf:cifar10"}))
