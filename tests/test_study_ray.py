"""Studies on Ray: the same records as in one process, and every planned run done exactly once after a worker or the driver is killed.

One local Ray instance (2 CPUs, no dashboard) serves the module and is shut down by the process
that started it. Its worker processes get the tests' small Fashion-MNIST look-alike and tiny zoo
through a setup hook (a module written next to the data), as the test process gets them.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import make_images, write_idx  # noqa: E402
from ktransfer.extras import MissingExtraError  # noqa: E402
from ktransfer.study import DB_FILE, Study, StudyConfig, load_records  # noqa: E402

SETUP_MODULE = "ktransfer_ray_test_setup"
SETUP = '''
"""Applied in the test process and in every Ray worker: the tests' small data and zoo, and hooks the tests steer by files."""
import os, time
from pathlib import Path

HERE = Path(__file__).parent


def setup():
    from ktransfer.data import fashion_mnist
    from ktransfer.models import store
    import ktransfer.study.executors as executors

    fashion_mnist.EXPECTED_COUNT.update(train=700, test=200)
    fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE = 500, 100, 200
    fashion_mnist._loaded.clear()
    store.DEFAULT_ZOO = {n: store.ZooRecipe(r.arch, r.seed, private_size=200, epochs=1, lr=r.lr, batch_size=64) for n, r in store.DEFAULT_ZOO.items()}
    if not getattr(executors.transfer, "paced", False):
        real = executors.transfer

        def paced(*args, **kwargs):  # while the file "pace" exists, each run lasts a moment longer
            result = real(*args, **kwargs)
            if (HERE / "pace").exists():
                time.sleep(1.5)
            return result

        paced.paced = True
        executors.transfer = paced


def slow_mlp():
    """zoo:mlp; the first process ever to build it notes its pid and waits, so a test can kill it mid-run."""
    from ktransfer.models import load_model

    try:
        fd = os.open(HERE / "first.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return load_model("zoo:mlp", data_dir=str(HERE / "fmnist"))
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(120)
    return load_model("zoo:mlp", data_dir=str(HERE / "fmnist"))
'''


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance of 2 CPUs whose workers see the tests' data and zoo; shut down by this process, which started it."""
    root = tmp_path_factory.mktemp("ray-study")
    (root / f"{SETUP_MODULE}.py").write_text(SETUP)
    data = root / "fmnist"
    data.mkdir()
    for stem, (images, labels) in {"train": make_images(700, seed=3), "t10k": make_images(200, seed=4)}.items():
        write_idx(data / f"{stem}-images-idx3-ubyte", images.squeeze(1).numpy())
        write_idx(data / f"{stem}-labels-idx1-ubyte", labels.numpy())
    cache = root / "cache"
    saved = {key: os.environ.get(key) for key in ("PYTHONPATH", "KTRANSFER_CACHE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(Path(__file__).parents[1] / "src"), saved["PYTHONPATH"]) if p)
    os.environ["KTRANSFER_CACHE"] = str(cache)  # the workers (started now) and the drivers share the zoo and the prediction cache
    sys.path.insert(0, str(root))
    import ktransfer_ray_test_setup as hooks  # noqa: E402

    from ktransfer.data import fashion_mnist
    from ktransfer.models import store
    import ktransfer.study.executors as executors

    originals = (dict(fashion_mnist.EXPECTED_COUNT), fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE, store.DEFAULT_ZOO, executors.transfer)
    hooks.setup()
    context = ray.init(num_cpus=2, include_dashboard=False, runtime_env={"worker_process_setup_hook": f"{SETUP_MODULE}.setup"}, log_to_driver=False)
    try:
        yield {"root": root, "data": data, "cache": cache, "address": context.address_info["gcs_address"]}
    finally:
        ray.shutdown()
        sys.path.remove(str(root))
        fashion_mnist.EXPECTED_COUNT.clear()
        fashion_mnist.EXPECTED_COUNT.update(originals[0])
        fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE, store.DEFAULT_ZOO, executors.transfer = originals[1:]
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def shared_cache(ray_instance, monkeypatch):
    monkeypatch.setenv("KTRANSFER_CACHE", str(ray_instance["cache"]))
    return ray_instance


def config(ray_instance, **overrides) -> dict:
    raw = {
        "name": "ray", "students": ["zoo:mlp", "zoo:cnn"], "methods": ["kl", {"name": "kl_dp", "lr": [0.01, 0.001]}], "epochs": 1, "lr": 0.01,
        "batch_size": 64, "data": {"source": "fashion-mnist", "dir": str(ray_instance["data"]), "transfer_size": 100, "eval_size": 100},
        "search": {"pairs": 2}, "controls": ["ce"],
    }
    return {**raw, **overrides}


def stored_runs(folder: Path) -> list[dict]:
    connection = sqlite3.connect(folder / DB_FILE)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT key, phase, status, attempts, finished FROM runs")]
    finally:
        connection.close()


COMPARED = ("acc_before", "acc_after", "delta", "knowledge_gain", "knowledge_loss", "pos_flips_after", "neg_flips_after", "lr", "hparams")


def comparable(records: list[dict]) -> dict:
    return {r["run_key"]: {k: r.get(k) for k in COMPARED} | {"losses": [e.get("loss") for e in r.get("history", [])]} for r in records}


def test_ray_gives_the_records_of_one_process(shared_cache, tmp_path):
    raw = config(shared_cache)
    local = Study(StudyConfig.from_dict(raw), tmp_path / "local")
    local.run(log=lambda line: None)
    lines: list[str] = []
    on_ray = Study(StudyConfig.from_dict({**raw, "executor": "ray"}), tmp_path / "ray")
    status = on_ray.run(log=lines.append)
    assert status["phases"]["search"]["done"] == 4 and status["phases"]["study"]["done"] == 6  # 2 pairs × (kl, kl_dp) + 2 ce controls
    assert "executor: ray, 2 run(s) at a time" in lines
    expected, got = comparable(load_records(local.folder)), comparable(load_records(on_ray.folder))
    assert len(expected) == 6 and got == expected
    assert json.loads((tmp_path / "ray" / "search.json").read_text()) == json.loads((tmp_path / "local" / "search.json").read_text())
    assert all(run["attempts"] == 1 and run["status"] == "done" for run in stored_runs(on_ray.folder))


def test_a_killed_worker_is_retried_and_its_run_done_once(shared_cache, tmp_path):
    root = shared_cache["root"]
    (root / "first.pid").unlink(missing_ok=True)
    raw = config(shared_cache, students=[f"{SETUP_MODULE}:slow_mlp"], teachers=["zoo:cnn"], methods=["kl", "kl_dp"], controls=[], executor="ray", max_retries=1)
    # The driver builds its models first; it must not be the process that waits to be killed.
    (root / "first.pid").write_text("driver")
    study = Study(StudyConfig.from_dict(raw), tmp_path / "study")
    driver_models_built = threading.Event()
    done: dict = {}

    def drive():
        done["status"] = study.run(log=lambda line: driver_models_built.set() if line.startswith("executor:") else None)

    thread = threading.Thread(target=drive)
    thread.start()
    while not driver_models_built.wait(0.2):
        assert thread.is_alive(), "the study ended before it started its runs"
    (root / "first.pid").unlink()  # now the first worker to build the student notes its pid and waits
    deadline = time.monotonic() + 60
    while not (root / "first.pid").exists() or not (root / "first.pid").read_text():
        assert time.monotonic() < deadline and thread.is_alive(), "no worker started the run"
        time.sleep(0.1)
    pid = int((root / "first.pid").read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # the worker process dies mid-run; Ray starts the task again elsewhere
    thread.join(180)
    assert not thread.is_alive()
    runs = stored_runs(study.folder)
    assert done["status"]["phases"]["study"] == {"pending": 0, "running": 0, "done": 2, "failed": 0, "planned": 2}
    assert sorted(r["attempts"] for r in runs) == [1, 1]  # the retry is Ray's, inside one submission
    assert len(load_records(study.folder)) == 2


LAUNCHER = """
import sys
import ray
import {module} as hooks
hooks.setup()
ray.init(address=sys.argv[1], runtime_env={{"worker_process_setup_hook": "{module}.setup"}}, log_to_driver=False)
from ktransfer.cli import main
main(sys.argv[2:], prog_name="ktransfer")
"""


def test_a_killed_driver_resumes_with_nothing_lost_or_repeated(shared_cache, tmp_path):
    root = shared_cache["root"]
    (root / "first.pid").unlink(missing_ok=True)
    config_path = tmp_path / "study.json"
    config_path.write_text(json.dumps(config(shared_cache, methods=["kl", "kl_dp"], executor="ray")))
    folder = tmp_path / "study"
    (root / "pace").write_text("")
    try:
        driver = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER.format(module=SETUP_MODULE), shared_cache["address"], "study", str(config_path), "--out", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
        )
        deadline = time.monotonic() + 120
        while not ((folder / DB_FILE).exists() and any(r["status"] == "done" for r in stored_runs(folder))):
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the driver finished no run in time"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
        driver.stderr.close()
    finally:
        (root / "pace").unlink(missing_ok=True)
    before = {r["key"]: r for r in stored_runs(folder)}
    finished_before = {k: r["finished"] for k, r in before.items() if r["status"] == "done"}
    assert finished_before and len(finished_before) < 6  # killed in the middle
    status = Study.open(folder).run(log=lambda line: None)
    assert status["phases"]["study"] == {"pending": 0, "running": 0, "done": 6, "failed": 0, "planned": 6}
    after = {r["key"]: r for r in stored_runs(folder)}
    assert {k: after[k]["finished"] for k in finished_before} == finished_before  # nothing done before was redone
    records = load_records(folder)
    assert len(records) == 6 and len({r["run_key"] for r in records}) == 6


def test_ray_absent_says_which_extra(monkeypatch):
    from ktransfer.study.executors import start_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without ray gives: ImportError
    with pytest.raises(MissingExtraError, match=r"^running a study on Ray \(--executor ray\) needs ray, which is not installed; run: pip install 'ktransfer\[ray\]'$"):
        start_ray()


def test_soup_ingredients_on_ray_give_the_soup_of_one_process(ray_instance, tiny_data, tmp_path):
    import torch

    from ktransfer.engine import Engine, TrainConfig
    from ktransfer.methods import create_method
    from ktransfer.models.base import Model
    from ktransfer.models.zoo import MLP
    from ktransfer.multi import transfer_multi
    from ktransfer.predictions import PredictionCache

    transfer_set, eval_set = tiny_data
    modules = []
    for seed, epochs in ((1, 1), (2, 3), (3, 1)):
        torch.manual_seed(seed)
        module = MLP(hidden=32)
        Engine(Model(module, "m"), create_method("ce"), transfer_set.subset(range(40 * seed), f"few{seed}"), TrainConfig(epochs=epochs, lr=0.05, batch_size=64, seed=seed)).run()
        modules.append(module.eval())
    student, *teachers = [Model(m, f"m{i}", spec=f"test:m{i}") for i, m in enumerate(modules)]
    settings = dict(epochs=1, lr=0.02, seed=0, strategy="soup")
    local_records, ray_records = [], []
    local = transfer_multi(student, teachers, transfer_set, eval_set, "kl", on_epoch=local_records.append, cache=PredictionCache(tmp_path / "a"), **settings)
    on_ray = transfer_multi(student, teachers, transfer_set, eval_set, "kl", on_epoch=ray_records.append, cache=PredictionCache(tmp_path / "b"), executor="ray", **settings)
    for key, value in local.student.state_dict().items():
        assert torch.equal(value, on_ray.student.state_dict()[key]), key
    assert on_ray.metrics["acc_after"] == local.metrics["acc_after"] and on_ray.metrics["delta"] == local.metrics["delta"]
    assert [(r["ingredient"], r["epoch"], r["acc"]) for r in ray_records] == [(r["ingredient"], r["epoch"], r["acc"]) for r in local_records]
    assert len(ray_records) == 2


def test_the_command_line_takes_the_executor(shared_cache, tmp_path):
    from click.testing import CliRunner

    from ktransfer.cli import main

    config_path = tmp_path / "study.json"
    config_path.write_text(json.dumps(config(shared_cache, methods=["kl"], controls=[])))  # no executor key: local by default
    folder = tmp_path / "study"
    result = CliRunner(env={"COLUMNS": "200"}).invoke(main, ["study", str(config_path), "--out", str(folder), "--executor", "ray"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "executor: ray, 2 run(s) at a time" in result.output
    assert len(load_records(folder)) == 2
