"""Checkpoints of a single transfer: a killed run resumes to the same weights; wrong or damaged checkpoints are handled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import ktransfer
from ktransfer.checkpoints import CheckpointError, CheckpointStore, RunFinishedError
from ktransfer.cli import main
from ktransfer.errors import ConfigError
from ktransfer.results import read_records

# A real `ktransfer transfer` process on the tests' small Fashion-MNIST look-alike and tiny zoo
# (the same patches as the fixtures), whose optimiser holds still once a chosen checkpoint exists,
# so that the test can kill it in the middle of an epoch.
LAUNCHER = """
import sys, time
from pathlib import Path
import torch
from ktransfer.data import fashion_mnist
fashion_mnist.EXPECTED_COUNT.update(train=700, test=200)
fashion_mnist.POOL_SIZE, fashion_mnist.TRANSFER_SIZE, fashion_mnist.VALIDATION_SIZE = 500, 100, 200
from ktransfer.models import store
store.DEFAULT_ZOO = {n: store.ZooRecipe(r.arch, r.seed, private_size=200, epochs=1, lr=r.lr, batch_size=64) for n, r in store.DEFAULT_ZOO.items()}
threads, hold_after, ready = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
torch.set_num_threads(threads)  # as the test process, so that float sums add up in the same order
real_step = torch.optim.SGD.step
def step(self, *args, **kwargs):
    if list(ready.parent.glob("checkpoints/*-step" + hold_after + ".pt")):
        ready.write_text("holding")
        time.sleep(600)  # mid-step, mid-epoch: the test kills the process here
    return real_step(self, *args, **kwargs)
torch.optim.SGD.step = step
from ktransfer.cli import main
main(sys.argv[4:], prog_name="ktransfer")
"""

METHOD_ARGS = {
    "kl_dp": ["--lr", "1e-2"],
    "xe_kl_mcl": ["--param", "slow_momentum=0.9"],
    "crd": ["--lr", "1e-2", "--param", "negatives=64", "--param", "feat_dim=16"],
}


def run(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def transfer_args(method, out, data_dir):
    # 100 transfer images in batches of 10: 10 steps an epoch, a checkpoint every 4 steps and at each epoch's end.
    return ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", method, *METHOD_ARGS[method], "--epochs", "2", "--batch-size", "10", "--checkpoint-every", "4", "--out", out, "--data-dir", data_dir]


def weights(out):
    (path,) = out.glob("*.safetensors")
    return load_file(path)


def without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def assert_same_run(reference, out) -> None:
    """The run in ``out`` saved bit-identical weights and the same history as the uninterrupted one in ``reference``."""
    expected, got = weights(reference), weights(out)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    (record,) = read_records(out / "results.jsonl")
    (reference_record,) = read_records(reference / "results.jsonl")
    assert without_seconds(record["history"]) == without_seconds(reference_record["history"])


@pytest.mark.parametrize("method", ["kl_dp", "xe_kl_mcl", "crd"])
def test_killed_transfer_resumes_to_bit_identical_weights(method, small_fashion_mnist, tiny_zoo, tmp_path):
    reference = tmp_path / "reference"
    result = run(*transfer_args(method, reference, small_fashion_mnist))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (reference / "checkpoints").iterdir()) == ["finished.json"]  # removed after success

    out = tmp_path / "killed"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    ready = out / "holding"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [str(a) for a in transfer_args(method, out, small_fashion_mnist)]
    # Held in step 13, epoch 2, after the checkpoints of steps 10 (the first epoch's end) and 12 (mid-epoch).
    process = subprocess.Popen([sys.executable, str(launcher), str(torch.get_num_threads()), "000000012", str(ready), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the transfer did not reach its step 12 checkpoint within a minute"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [name.rsplit("-", 1)[1] for name in left] == ["step000000010.pt", "step000000012.pt"]  # the previous one is kept
    assert not (out / "results.jsonl").exists() and not list(out.glob("*.safetensors"))

    if method == "kl_dp":  # another configuration in the same folder is refused, and nothing is touched
        refused = run(*transfer_args(method, out, small_fashion_mnist)[:-4], "--seed", "1", *transfer_args(method, out, small_fashion_mnist)[-4:])
        assert refused.exit_code != 0 and refused.output.strip().splitlines()[-1].startswith("Error: ")
        assert "seed: 0 there, 1 now" in refused.output and "another --out" in refused.output and "delete" in refused.output
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == left

    resumed = run(*transfer_args(method, out, small_fashion_mnist))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and "step000000012.pt (epoch 2 of 2, batch 2 of 10, step 12)" in resumed.output
    assert_same_run(reference, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["finished.json"]

    again = run(*transfer_args(method, out, small_fashion_mnist))
    assert again.exit_code == 0 and "finished already" in again.output
    assert len(read_records(out / "results.jsonl")) == 1


# ---------------------------------------------------------------- the Python API


class Stop(Exception):
    pass


def stop_at(step_to_stop):
    def on_step(step, total):
        if step == step_to_stop:
            raise Stop

    return on_step


def tiny_models():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    return student, teacher


def test_another_configuration_is_refused_and_a_finished_run_is_not_rerun(tiny_data, tmp_path):
    student, teacher = tiny_models()
    folder = tmp_path / "checkpoints"
    settings = dict(method="kl", epochs=2, batch_size=64, lr=1e-2, checkpoint_dir=folder, checkpoint_every=2)
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, on_step=stop_at(3), **settings)
    with pytest.raises(CheckpointError, match=r"lr: 0.01 there, 0.02 now.*delete"):
        ktransfer.transfer(student, teacher, *tiny_data, **{**settings, "lr": 2e-2})
    with pytest.raises(CheckpointError, match=r"\(hparams.temperature: 1.0 there, 2.0 now\)"):
        ktransfer.transfer(student, teacher, *tiny_data, temperature=2.0, **settings)
    lines = []
    ktransfer.transfer(student, teacher, *tiny_data, log=lines.append, **settings)
    assert len(lines) == 1 and lines[0].startswith("resuming from") and "step 2)" in lines[0]
    with pytest.raises(RunFinishedError, match="finished already"):
        ktransfer.transfer(student, teacher, *tiny_data, **settings)
    # Another configuration may start in the folder once the first run has finished.
    other = ktransfer.transfer(student, teacher, *tiny_data, **{**settings, "lr": 2e-2})
    assert len(other.history) == 2


def test_a_run_on_top_k_views_is_not_resumed_with_other_targets_nor_the_reverse(tiny_data, tmp_path):
    from ktransfer.predictions import PredictionCache

    student, teacher = tiny_models()
    cache = PredictionCache(tmp_path / "cache")
    settings = dict(method="kl", epochs=2, batch_size=64, lr=1e-2, augment="paper", cache=cache, checkpoint_every=2)
    views = dict(targets="views", cache_top_k=3)
    folder = tmp_path / "top-k"
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, on_step=stop_at(3), **views, **settings)
    with pytest.raises(CheckpointError, match=r"cache_dtype: float16 there, null now; cache_top_k: 3 there, null now; targets: views there, online now"):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, targets="online", **settings)
    with pytest.raises(CheckpointError, match=r"\(cache_top_k: 3 there, 0 now\)"):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, targets="views", **settings)
    with pytest.raises(CheckpointError, match=r"\(cache_dtype: float16 there, float32 now\)"):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, cache_dtype="float32", **views, **settings)
    # The reverse: a run with online targets is not resumed on (top-k) views.
    folder = tmp_path / "online"
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, targets="online", on_step=stop_at(3), **settings)
    with pytest.raises(CheckpointError, match=r"targets: online there, views now"):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, **views, **settings)
    lines = []  # the same settings resume
    ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, targets="online", log=lines.append, **settings)
    assert len(lines) == 1 and lines[0].startswith("resuming from")


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny_data, tmp_path):
    student, teacher = tiny_models()
    settings = dict(method="xe_kl_mcl", epochs=2, batch_size=64, seed=3)
    uninterrupted = ktransfer.transfer(student, teacher, *tiny_data, **settings)
    folder = tmp_path / "checkpoints"
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, checkpoint_every=2, on_step=stop_at(9), **settings)
    previous, newest = sorted(folder.glob("*.pt"))
    assert newest.name.endswith("step000000008.pt") and previous.name.endswith("step000000006.pt")
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    lines = []
    resumed = ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, checkpoint_every=2, log=lines.append, **settings)
    assert lines[0].startswith(f"Warning: checkpoint {newest} cannot be read") and f"resuming from {previous}" in lines[1]
    for key, value in uninterrupted.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert (folder / (newest.name + ".corrupt")).exists()  # set aside, never deleted
    assert not list(folder.glob("*.pt"))


def test_processes_sharing_a_damaged_newest_checkpoint_all_fall_back_and_one_sets_it_aside(tmp_path, monkeypatch):
    """Under torchrun every rank reads the same folder; only rank 0 renames a damaged file aside."""
    main, other = CheckpointStore(tmp_path, {"run": 1}), CheckpointStore(tmp_path, {"run": 1})  # rank 0's and rank 1's
    main.save({"weights": 4}, 4)
    newest = main.save({"weights": 8}, 8)
    newest.write_bytes(b"truncated")
    aside = newest.with_name(newest.name + ".corrupt")
    # The race: rank 1 listed the damaged file, then rank 0 set it aside before rank 1 read it. Rank 1 falls
    # back to the one before instead of raising, whether it would rename the file too or, as under torchrun, not.
    real_load, rank_0_reading = torch.load, []

    def load_after_rank_0_set_it_aside(path, *args, **kwargs):
        if Path(path) == newest and newest.exists() and not rank_0_reading:
            rank_0_reading.append(True)
            assert main.load_latest()["state"] == {"weights": 4}  # rank 0, meanwhile: it renames the file
            rank_0_reading.clear()
        return real_load(path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", load_after_rank_0_set_it_aside)
        assert other.load_latest()["state"] == {"weights": 4}
        assert aside.exists() and not newest.exists()
        os.replace(aside, newest)
        assert other.load_latest(set_aside=False)["state"] == {"weights": 4}
        assert aside.exists() and not newest.exists()
    # Without the race rank 1 passes over the file and leaves it to rank 0.
    os.replace(aside, newest)
    assert other.load_latest(set_aside=False)["state"] == {"weights": 4}
    assert newest.exists() and not aside.exists()


def test_keep_checkpoints_and_no_checkpoints_without_a_folder(tiny_data, tmp_path):
    student, teacher = tiny_models()
    plain = ktransfer.transfer(student, teacher, *tiny_data, method="kl", epochs=2, batch_size=64)
    folder = tmp_path / "kept"
    kept = ktransfer.transfer(student, teacher, *tiny_data, method="kl", epochs=2, batch_size=64, checkpoint_dir=folder, keep_checkpoints=True)
    assert [p.name.rsplit("-", 1)[1] for p in sorted(folder.glob("*.pt"))] == ["step000000006.pt", "step000000012.pt"]  # each epoch's end
    for key, value in plain.student.state_dict().items():
        assert torch.equal(value, kept.student.state_dict()[key]), key
    with pytest.raises(ConfigError, match="need checkpoint_dir"):
        ktransfer.transfer(student, teacher, *tiny_data, method="kl", epochs=1, checkpoint_every=5)


def test_augmented_run_resumes_mid_epoch_from_a_time_based_checkpoint(tiny_data, tmp_path):
    student, teacher = tiny_models()
    settings = dict(method="kl_dp", epochs=2, batch_size=64, lr=1e-2, augment="paper")
    uninterrupted = ktransfer.transfer(student, teacher, *tiny_data, **settings)
    folder = tmp_path / "checkpoints"
    # A tiny time budget makes a checkpoint due after every step.
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, checkpoint_minutes=1e-9, on_step=stop_at(8), **settings)
    previous, newest = sorted(folder.glob("*.pt"))
    assert previous.name.endswith("step000000007.pt") and newest.name.endswith("step000000008.pt")
    lines = []
    resumed = ktransfer.transfer(student, teacher, *tiny_data, checkpoint_dir=folder, log=lines.append, **settings)
    assert lines == [f"resuming from {newest} (epoch 2 of 2, batch 2 of 6, step 8)"]
    for key, value in uninterrupted.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert without_seconds(resumed.history) == without_seconds(uninterrupted.history)


def test_a_crd_checkpoint_holds_its_heads_their_optimiser_state_and_its_memory(tiny_data, tmp_path):
    student, teacher = tiny_models()
    folder = tmp_path / "checkpoints"
    with pytest.raises(Stop):
        ktransfer.transfer(student, teacher, *tiny_data, method="crd", epochs=1, batch_size=64, negatives=100, feat_dim=8, checkpoint_dir=folder, checkpoint_every=2, on_step=stop_at(2))
    (path,) = folder.glob("*.pt")
    state = torch.load(path, weights_only=True)["state"]
    method = state["method"]
    assert method["embed_student"]["weight"].shape == (8, 16) and method["embed_teacher"]["weight"].shape == (8, 16)
    assert int(method["memory"]["pointer"]) == 128 % 100 and (method["memory"]["index"] >= 0).sum() == 100  # 128 samples queued into 100 slots
    assert method["log_normalisers"] is not None
    optimiser = state["loop"]["optimizer"]
    student_parameters = len(list(student.parameters()))
    assert len(optimiser["state"]) == student_parameters + 4  # the heads' weights and biases have momentum too
    assert all("momentum_buffer" in entry for entry in optimiser["state"].values())
    assert state["loop"]["position"] == 2 and state["loop"]["step"] == 2 and state["loop"]["epoch"] == 0


# A `ktransfer transfer` process whose steps slow down once a chosen checkpoint exists, so that the test
# can press Ctrl-C (SIGINT) in the middle of an epoch; the step in progress runs to its end.
SLOW_LAUNCHER = LAUNCHER.replace('time.sleep(600)  # mid-step, mid-epoch: the test kills the process here', 'time.sleep(0.2)')


def test_ctrl_c_writes_a_checkpoint_and_the_same_command_resumes_to_the_same_weights(small_fashion_mnist, tiny_zoo, tmp_path):
    assert SLOW_LAUNCHER != LAUNCHER
    reference = tmp_path / "reference"
    assert run(*transfer_args("kl_dp", reference, small_fashion_mnist)).exit_code == 0

    out = tmp_path / "interrupted"
    launcher = tmp_path / "launch.py"
    launcher.write_text(SLOW_LAUNCHER)
    ready = out / "holding"
    args = [str(a) for a in transfer_args("kl_dp", out, small_fashion_mnist)]
    process = subprocess.Popen([sys.executable, str(launcher), str(torch.get_num_threads()), "000000012", str(ready), *args], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the transfer did not reach its step 12 checkpoint within a minute"
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 130, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("Interrupted at epoch 2 of 2, batch ") and "To resume, run the same command again." in last and "Traceback" not in output
    written = last.split("checkpoint written to ")[1].split(". To resume")[0]
    assert os.path.exists(written) and not written.endswith("step000000012.pt")  # a new one, at the step it stopped after
    assert not (out / "results.jsonl").exists()

    resumed = run(*transfer_args("kl_dp", out, small_fashion_mnist))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {written}" in resumed.output
    assert_same_run(reference, out)
