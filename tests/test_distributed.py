"""One transfer on two processes (torchrun, gloo, CPU) against the same transfer in one process.

Each launch costs a few seconds, so one launch runs every Python-API case and the tests read
what it wrote; one more launch runs the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ktransfer
from ktransfer.distributed import Ranks, check_distributable
from ktransfer.errors import ConfigError
from ktransfer.methods import create_method
from ktransfer.metrics import transfer_metrics
from ktransfer.predictions import compute_logits
from ktransfer.models.base import as_model

from folder_helpers import write_split_folder

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"

# The models and data of the API cases; the launched script imports this same module.
CASES_MODULE = '''
import torch
from torch import nn
from conftest import make_images
from ktransfer.data.base import ImageData

NAMES = [f"c{i}" for i in range(10)]
# (name, method, targets, student with batch-norm)
CASES = [
    ("kl-cached", "kl", "cached", False),
    ("kl-online", "kl", "online", False),
    ("kl_dp-cached", "kl_dp", "cached", False),
    ("kl_dp-online", "kl_dp", "online", False),
    ("bn-kl_dp", "kl_dp", "cached", True),
    ("bn-mcl", "xe_kl_mcl", "online", True),
    ("mcl-cached", "xe_kl_mcl", "cached", False),  # its KL is a mean over the kept samples of the whole global batch
    ("guard-bn-kl", "kl", "cached", True),
    ("short-bn-kl", "kl", "cached", True),  # global batch 4 over 199 images: the last batch of 3 must not give a rank one sample
    ("augment-kl_dp", "kl_dp", "online", False),  # the paper's augmentation: each sample's view follows its index, on any rank  # with the no-regression guard (its held-out share scored sharded too)
]
SETTINGS = dict(epochs=2, batch_size=32, lr=0.2, seed=3)
HPARAMS = {"bn-mcl": {"slow_momentum": 0.5}, "mcl-cached": {"slow_momentum": 0.5}}
OVERRIDES = {"short-bn-kl": {"batch_size": 4}}
TRANSFER_SIZES = {"short-bn-kl": 199}  # slow weights that move within two epochs


def _reader(known, seed, norm=()):
    """Reads the class band of make_images (rows 2c, 2c+1, pooled to row c), for the classes it knows."""
    torch.manual_seed(seed)
    head = nn.Linear(14, 10)
    with torch.no_grad():
        head.weight.mul_(0.5)
        for c in known:
            head.weight[c, c] += 8
    return nn.Sequential(nn.AdaptiveAvgPool2d((14, 1)), nn.Flatten(), *norm, head)


def student(bn):
    """Knows classes 0-5 (60%): the teacher knows 3-9 (70%), so KL forgets 0-2 and KL+DP keeps them."""
    return _reader(range(0, 6), 0, [nn.BatchNorm1d(14)] if bn else [])


def teacher():
    return _reader(range(3, 10), 1)


def data(transfer_size=201):
    # 201 transfer images: the last batch of 32 is short (9) and splits 5/4 over two ranks.
    # 1001 evaluation images: not divisible by two processes.
    return ImageData(*make_images(transfer_size, seed=1), NAMES, "t"), ImageData(*make_images(1001, seed=2), NAMES, "e")
'''

SCRIPT = '''
import json, os, sys
import ktransfer
from ktransfer.methods import create_method
from ddp_cases import CASES, HPARAMS, OVERRIDES, SETTINGS, TRANSFER_SIZES, data, student, teacher

out = sys.argv[1]
rank = int(os.environ["RANK"])
transfer_set, eval_set = data()
for name, method, targets, bn in CASES:
    calls = {"epochs": 0, "results": 0}
    case_set = data(TRANSFER_SIZES[name])[0] if name in TRANSFER_SIZES else transfer_set
    result = ktransfer.transfer(
        student(bn), teacher(), case_set, eval_set, method=method, targets=targets, **{**SETTINGS, **OVERRIDES.get(name, {})}, guard=name.startswith("guard"), augment="paper" if name.startswith("augment") else "none", **HPARAMS.get(name, {}),
        on_epoch=lambda record: calls.__setitem__("epochs", calls["epochs"] + 1),
        on_result=lambda result: calls.__setitem__("results", calls["results"] + 1),
    )
    metrics = {k: v for k, v in result.metrics.items() if k != "seconds"}
    metrics["history"] = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in metrics["history"]]  # timings differ
    json.dump({"metrics": metrics, "calls": calls}, open(f"{out}/{name}-rank{rank}.json", "w"))
    if rank == 0:
        result.save_student(f"{out}/{name}.safetensors")

# Stopped at step 6 (every process, as a crash would), after rank 0's checkpoint at step 4 (mid-epoch 1 of
# 7 steps); the same call again resumes there, past a damaged newer one.
method = create_method("kl")

def crash(student, step):
    if step == 6:
        raise RuntimeError("stopped")

method.after_step = crash
settings = dict(method=method, targets="cached", **SETTINGS, checkpoint_dir=f"{out}/checkpoints", checkpoint_every=4)
try:
    ktransfer.transfer(student(False), teacher(), transfer_set, eval_set, **settings)
except RuntimeError:
    pass
# A damaged newer checkpoint: every process passes over it to step 4's, and rank 0 alone sets it aside.
import pathlib
import torch.distributed as dist
if rank == 0:
    (saved,) = pathlib.Path(f"{out}/checkpoints").glob("*-step000000004.pt")
    saved.with_name(saved.name.replace("step000000004", "step000000005")).write_bytes(b"truncated")
dist.barrier()
lines = []
settings["method"] = create_method("kl")
result = ktransfer.transfer(student(False), teacher(), transfer_set, eval_set, **settings, log=lines.append)
metrics = {k: v for k, v in result.metrics.items() if k != "seconds"}
json.dump({"metrics": metrics, "log": lines}, open(f"{out}/resumed-rank{rank}.json", "w"))
'''


def _environment(*paths) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def torchrun(args, cwd, *paths, processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N ARGS`` with this interpreter (the torchrun module), on gloo and the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env=_environment(*paths), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The API cases, launched once on two processes; yields the module of the cases and the output folder."""
    root = tmp_path_factory.mktemp("ddp")
    cache = root / "cache"
    (root / "ddp_cases.py").write_text(CASES_MODULE)
    (root / "ddp_script.py").write_text(SCRIPT)
    old_cache = os.environ.get("KTRANSFER_CACHE")
    os.environ["KTRANSFER_CACHE"] = str(cache)
    try:
        torchrun(["ddp_script.py", root], root, root)
    finally:
        os.environ.pop("KTRANSFER_CACHE") if old_cache is None else os.environ.__setitem__("KTRANSFER_CACHE", old_cache)
    sys.path.insert(0, str(root))
    try:
        import ddp_cases

        yield ddp_cases, root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("ddp_cases", None)


def _saved_student(module, root: Path, name: str, bn: bool) -> nn.Module:
    net = module.student(bn)
    net.load_state_dict(load_file(root / f"{name}.safetensors"))
    return net.eval()


@pytest.mark.parametrize("name", ["kl-cached", "kl-online", "kl_dp-cached", "kl_dp-online", "augment-kl_dp", "mcl-cached"])
def test_two_processes_match_one_process(cases, name):
    module, root = cases
    _, method, targets, bn = next(case for case in module.CASES if case[0] == name)
    transfer_set, eval_set = module.data()
    augment = "paper" if name.startswith("augment") else "none"
    alone = ktransfer.transfer(module.student(bn), module.teacher(), transfer_set, eval_set, method=method, targets=targets, augment=augment, distributed=False, **module.SETTINGS, **module.HPARAMS.get(name, {}))
    two = json.loads((root / f"{name}-rank0.json").read_text())["metrics"]
    assert two["processes"] == 2 and two["batch_size"] == 32 and two["n_eval"] == 1001 and two["targets"] == targets
    # The transfer must have changed the student, or matching would say little.
    assert alone.metrics["acc_after"] - alone.metrics["acc_before"] > 10
    assert abs(two["acc_after"] - alone.metrics["acc_after"]) <= 0.1
    assert abs(two["delta"] - alone.metrics["delta"]) <= 0.1
    assert len(two["history"]) == 2
    for epoch_two, epoch_alone in zip(two["history"], alone.history):  # the logged loss is the global batch's mean
        assert epoch_two["train_loss"] == pytest.approx(epoch_alone["train_loss"], rel=1e-4)


@pytest.mark.parametrize("name", ["kl-cached", "kl-online", "kl_dp-cached", "kl_dp-online", "bn-kl_dp", "bn-mcl", "mcl-cached", "guard-bn-kl", "short-bn-kl", "augment-kl_dp"])
def test_counts_are_exact_for_the_saved_student(cases, name):
    """Sharded, gathered evaluation on 1001 images (odd: uneven shards) counts each once: the same
    counts as one process gets from the saved weights, batch-norm statistics and MCL's slow weights included."""
    module, root = cases
    _, method, targets, bn = next(case for case in module.CASES if case[0] == name)
    transfer_set, eval_set = module.data()
    record = json.loads((root / f"{name}-rank0.json").read_text())["metrics"]
    before = compute_logits(as_model(module.student(bn), "s"), eval_set).argmax(1)
    teacher = compute_logits(as_model(module.teacher(), "t"), eval_set).argmax(1)
    after = compute_logits(as_model(_saved_student(module, root, name, bn), "s"), eval_set).argmax(1)
    expected = transfer_metrics(eval_set.labels, before, after, teacher)
    for key in ("n_eval", "acc_before", "acc_after", "gain_count", "loss_count", "pos_flips_after", "neg_flips_after", "teacher_acc"):
        assert record[key] == expected[key], key
    if name.startswith("guard"):
        assert record["guard_size"] == 20 and 0 <= record["guard_epoch"] <= 2
    if name == "short-bn-kl":  # 49 full batches of 4 and a last one of 3, on two processes: it trained on all
        assert record["n_transfer"] == 199 and record["batch_size"] == 4 and len(record["history"]) == 2


def test_every_rank_returns_the_same_metrics_and_only_rank_0_reports(cases):
    module, root = cases
    for name, *_ in module.CASES:
        zero, one = (json.loads((root / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1))
        assert zero["metrics"] == one["metrics"]
        assert zero["calls"] == {"epochs": 2, "results": 1}
        assert one["calls"] == {"epochs": 0, "results": 0}


def test_a_run_stopped_mid_epoch_resumes_from_rank_0s_checkpoint(cases):
    module, root = cases
    uninterrupted = json.loads((root / "kl-cached-rank0.json").read_text())["metrics"]
    zero, one = (json.loads((root / f"resumed-rank{rank}.json").read_text()) for rank in (0, 1))
    assert len(zero["log"]) == 2 and zero["log"][0].startswith("Warning: checkpoint") and "step000000005.pt cannot be read" in zero["log"][0]
    assert zero["log"][1].startswith("resuming from") and "step 4" in zero["log"][1]
    assert one["log"] == []  # only rank 0 logs
    assert len(list((root / "checkpoints").glob("*-step000000005.pt.corrupt"))) == 1  # set aside once, no rank failed
    for resumed in (zero["metrics"], one["metrics"]):
        for key in ("acc_after", "gain_count", "loss_count", "pos_flips_after", "neg_flips_after"):
            assert resumed[key] == uninterrupted[key], key
        # The first epoch's logged loss adds the sums saved at step 4 (over both processes) to the rest.
        for epoch_resumed, epoch_uninterrupted in zip(resumed["history"], uninterrupted["history"]):
            assert epoch_resumed["train_loss"] == pytest.approx(epoch_uninterrupted["train_loss"], rel=1e-6)
    assert list((root / "checkpoints").glob("*.pt")) == []  # the finished run's checkpoints are removed


def test_a_batch_is_shared_out_with_weights_that_make_the_global_mean():
    # Two ranks, global batch 4, eleven samples: batches [0..3], [4..7], and a short [8, 9, 10].
    order = torch.arange(11)
    first, second = Ranks(0, 2, 0).shard(order, 4), Ranks(1, 2, 1).shard(order, 4)
    assert first.full.tolist() == [0, 1, 4, 5] and second.full.tolist() == [2, 3, 6, 7]
    # The last batch of 3 would leave rank 1 one sample, on which batch-norm cannot train: rank 0 takes
    # all 3 (more than its per-step 2), rank 1 steps on a stand-in of two samples with weight 0.
    assert first.last.tolist() == [8, 9, 10] and second.last.tolist() == [8, 9]
    assert first.weights == [1.0, 1.0, 2.0] and second.weights == [1.0, 1.0, 0.0]
    # Without a short last batch there is no last step.
    assert Ranks(1, 2, 1).shard(torch.arange(8), 4).last is None
    # Three ranks, global batch 6, seven samples: the last batch (one sample) goes to rank 0, as one process
    # has it; the others step on a stand-in with weight 0, and the weights still average to one.
    parts = [Ranks(rank, 3, rank).shard(torch.arange(7), 6) for rank in range(3)]
    assert [p.full.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p.last.tolist() for p in parts] == [[6], [6], [6]]
    assert [p.weights for p in parts] == [[1.0, 3.0], [1.0, 0.0], [1.0, 0.0]]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_no_rank_trains_on_one_sample_of_a_short_last_batch(world_size):
    """Every short last batch of 2..2W-1 samples: each sample once, rank 0 always has some, no rank exactly
    one (batch-norm fails on it), and the weights average to 1 (the global batch's mean loss)."""
    batch_size = 2 * world_size
    for size in range(2, batch_size):
        shards = [Ranks(rank, world_size, rank).shard(torch.arange(size), batch_size) for rank in range(world_size)]
        real = [shard.last.tolist() for shard in shards if shard.weights[-1] > 0]
        assert sorted(sum(real, [])) == list(range(size)), size
        assert shards[0].weights[-1] > 0 and all(len(shard.last) >= 2 for shard in shards), size
        for shard in shards:
            assert shard.weights[-1] == len(shard.last) * world_size / size or shard.weights[-1] == 0
        assert sum(shard.weights[-1] for shard in shards) / world_size == pytest.approx(1.0)


def test_methods_with_a_memory_of_embeddings_are_refused():
    with pytest.raises(ConfigError, match="crd keeps a memory of embeddings.*run it in one process"):
        check_distributable(create_method("crd"), [])
    check_distributable(create_method("kl_dp"), [])  # no error


def test_distributed_outside_torchrun_is_one_clear_line(tiny_data, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    transfer_set, eval_set = tiny_data
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    with pytest.raises(ConfigError, match="not started by torchrun; launch it with torchrun"):
        ktransfer.transfer(net, net, transfer_set, eval_set, method="kl", epochs=1, distributed=True)


USER_MODELS = '''
import torch
from torch import nn

def make(width=8):
    torch.manual_seed(width)
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
'''


def test_torchrun_runs_the_command_line_and_rank_0_alone_writes(tmp_path):
    root = write_split_folder(tmp_path / "images", train_per_class=8, val_per_class=5)  # 15 evaluation images
    code = tmp_path / "code"
    code.mkdir()
    (code / "ddp_user_models.py").write_text(textwrap.dedent(USER_MODELS))
    out = tmp_path / "run"
    args = [
        "-m", "ktransfer", "transfer", "--student", "ddp_user_models:make?width=8", "--teacher", "ddp_user_models:make?width=12",
        "--data", f"folder:{root}", "--image-size", "16", "--stream", "--workers", "0", "--epochs", "2", "--batch-size", "6", "--lr", "0.05", "--method", "kl", "--out", out,
    ]
    done = torchrun(args, tmp_path, code)
    records = (out / "results.jsonl").read_text().splitlines()
    assert len(records) == 1
    record = json.loads(records[0])
    assert record["processes"] == 2 and record["n_eval"] == 15 and record["n_transfer"] == 24
    assert len(list(out.glob("*.safetensors"))) == 1
    assert done.stdout.count("epoch 1:") == 1 and done.stdout.count("student saved to") == 1
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("*.pt"))  # removed when finished
