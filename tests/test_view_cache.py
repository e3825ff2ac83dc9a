"""The frozen outputs cached per augmented view: exact, reused across students and runs, refused when the views differ."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import ktransfer
from ktransfer.cli import main
from ktransfer.data.base import ImageData
from ktransfer.errors import ConfigError
from ktransfer.models.base import Model, Preprocess
from ktransfer.predictions import PredictionCache
from ktransfer.view_cache import ViewCache, ViewCacheError, ViewCachedTargets


class SmallNet(nn.Module):
    def __init__(self, seed: int, size: int = 12):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * size * size, 10))
        self.num_classes = 10

    def forward(self, x):
        return self.body(x)


class Counting(nn.Module):
    """Counts its forward passes (shared by deep copies, so a student copy counts too)."""

    def __init__(self, inner: nn.Module, counter: list):
        super().__init__()
        self.inner, self.counter, self.num_classes = inner, counter, 10

    def forward(self, x):
        self.counter.append(len(x))
        return self.inner(x)

    def __deepcopy__(self, memo):
        copied = Counting.__new__(Counting)
        nn.Module.__init__(copied)
        copied.inner, copied.counter, copied.num_classes = __import__("copy").deepcopy(self.inner, memo), [], 10
        return copied


def model(seed: int, name: str, counter: list | None = None) -> Model:
    module = SmallNet(seed)
    if counter is not None:
        module = Counting(module, counter)
    return Model(module, name, Preprocess((0.5,), (0.5,), (12, 12)))


def data(count: int = 96, seed: int = 0) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, 14, 14), dtype=torch.uint8, generator=generator)
    return ImageData(images, torch.arange(count) % 10, [str(c) for c in range(10)], f"views-test-{seed}")


SETTINGS = dict(method="kl_dp", epochs=2, lr=0.05, batch_size=16, augment="paper", seed=3)


def weights(result) -> dict:
    return {k: v.clone() for k, v in result.student.state_dict().items()}


def test_float32_views_give_the_online_run_bit_for_bit(tmp_path):
    transfer_set, eval_set = data(), data(40, seed=1)
    online = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="online", **SETTINGS)
    cache = PredictionCache(tmp_path)
    cached = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="views", cache_dtype="float32", cache=cache, **SETTINGS)
    for key, value in weights(online).items():
        assert torch.equal(value, weights(cached)[key]), key
    assert cached.metrics["targets"] == "views" and online.metrics["targets"] == "online"
    record = cached.metrics["view_cache"]
    # teacher and original student, 2 epochs of 96 samples: 10 logits and 2 routing confidences, float32; 8 .npy headers
    assert record["dtype"] == "float32" and record["bytes"] == 2 * 2 * 96 * (10 + 2) * 4 + 8 * 128


def test_float16_views_move_the_metrics_by_little(tmp_path):
    transfer_set, eval_set = data(), data(40, seed=1)
    online = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="online", **SETTINGS)
    half = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="views", cache=PredictionCache(tmp_path), **SETTINGS)
    assert half.metrics["view_cache"]["dtype"] == "float16"
    largest = max(float((a - b).abs().max()) for a, b in zip(weights(online).values(), weights(half).values()))
    assert 0 < largest < 1e-2  # rounded targets, not other targets
    assert abs(half.metrics["acc_after"] - online.metrics["acc_after"]) <= 100 / 40  # at most one of 40 samples


def test_each_frozen_model_runs_once_per_epoch_for_every_student(tmp_path):
    transfer_set, eval_set, cache = data(), data(40, seed=1), PredictionCache(tmp_path)
    teacher_calls = []
    teacher = model(1, "teacher", teacher_calls)
    for student_seed in (0, 5):  # two students with the same input frame read the teacher's views
        ktransfer.transfer(model(student_seed, f"student{student_seed}"), teacher, transfer_set, eval_set, targets="views", cache=cache, **SETTINGS)
    # Whole passes over the transfer set (the cache builds one batch of 96 here); the rest are the
    # two-sample input checks before each run and the evaluation-set predictions.
    passes = [n for n in teacher_calls if n == len(transfer_set)]
    assert len(passes) == SETTINGS["epochs"]  # once per epoch, not once per student and epoch
    teacher_calls.clear()
    longer = {**SETTINGS, "epochs": 3}  # a longer run adds one shard and reuses the others
    ktransfer.transfer(model(0, "student0"), teacher, transfer_set, eval_set, targets="views", cache=cache, **longer)
    assert [n for n in teacher_calls if n == len(transfer_set)] == [len(transfer_set)]


def test_other_views_get_another_key_and_a_copied_folder_is_refused_saying_why(tmp_path):
    transfer_set, student_pre = data(), Preprocess((0.5,), (0.5,), (12, 12))
    teacher = model(1, "teacher")
    base = ViewCache(tmp_path, teacher, transfer_set, student_pre, seed=3)
    assert ViewCache(tmp_path, teacher, transfer_set, student_pre, seed=4).folder != base.folder
    assert ViewCache(tmp_path, teacher, transfer_set, Preprocess((0.5,), (0.5,), (10, 10)), seed=3).folder != base.folder  # another frame
    assert ViewCache(tmp_path, model(2, "other"), transfer_set, student_pre, seed=3).folder != base.folder
    assert ViewCache(tmp_path, teacher, transfer_set, student_pre, seed=3, dtype="float32").folder != base.folder
    base.build(0)
    other = ViewCache(tmp_path, teacher, transfer_set, student_pre, seed=4)
    other.folder.parent.mkdir(parents=True, exist_ok=True)
    base.folder.rename(other.folder)  # seed 3's views where seed 4's belong
    with pytest.raises(ViewCacheError, match=r"built for other views: seed is 3, this run needs 4; delete the folder"):
        ViewCache(tmp_path, teacher, transfer_set, student_pre, seed=4)


def test_check_finds_a_damaged_entry(tmp_path):
    cache = ViewCache(tmp_path, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3)
    cache.build(0)
    assert cache.check(samples=96) == {0: {"samples": 96, "max_abs_difference": pytest.approx(0, abs=5e-3), "ok": True}}
    stored = np.load(cache.shard(0) / "logits.npy")
    stored[7, 2] += 1.0
    np.save(cache.shard(0) / "logits.npy", stored)
    damaged = ViewCache(tmp_path, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3)
    report = damaged.check(samples=96)
    assert report[0]["ok"] is False and report[0]["max_abs_difference"] > 0.9


def test_views_need_augmentation_and_a_cache_folder():
    transfer_set, eval_set = data(), data(40, seed=1)
    with pytest.raises(ConfigError, match="views caches the frozen outputs per augmented view; without augmentation use cached"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, targets="views", epochs=1)
    with pytest.raises(ConfigError, match="give a cache"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, targets="views", augment="paper", epochs=1)
    with pytest.raises(ConfigError, match="cache_dtype must be one of float16, float32"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, targets="views", augment="paper", epochs=1, cache=PredictionCache(), cache_dtype="int8")


def test_views_targets_read_what_was_built(tmp_path):
    transfer_set, pre = data(), Preprocess((0.5,), (0.5,), (12, 12))
    source = ViewCachedTargets.for_transfer(tmp_path, [model(1, "teacher")], model(0, "original"), transfer_set, pre, "paper", 3, "float32")
    assert source.ensure(2) == 4 and source.ensure(2) == 0
    index = torch.tensor([5, 0, 93])
    batch = source.get(index, torch.zeros(3, 1, 12, 12), epoch=1)
    again = source.teachers[0].views_logits(index, 1)
    # recomputed in a batch of 3 rather than 96: equal up to the kernels' summation order
    assert batch.teacher_logits.shape == (1, 3, 10) and torch.allclose(batch.teacher_logits[0], again, atol=1e-6)


def test_precompute_command_builds_and_checks(tmp_path, small_fashion_mnist, tiny_zoo):
    runner = CliRunner()
    args = ["precompute", "--model", "zoo:mlp", "--model", "zoo:cnn", "--student", "zoo:cnn", "--data-dir", str(small_fashion_mnist), "--epochs", "2", "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "4 shards built" in result.output
    result = runner.invoke(main, [*args, "--check", "16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "0 shards built" in result.output and "all checked entries match" in result.output
    metas = list((tmp_path / "cache" / "views").glob("*/meta.json"))
    assert len(metas) == 2 and {json.loads(m.read_text())["seed"] for m in metas} == {0}


def test_transfer_command_reads_the_views_precompute_built(tmp_path, small_fashion_mnist, tiny_zoo):
    runner = CliRunner()
    common = ["--data-dir", str(small_fashion_mnist), "--epochs", "2"]
    built = runner.invoke(main, ["precompute", "--model", "zoo:mlp", "--model", "zoo:cnn", "--student", "zoo:cnn", *common], catch_exceptions=False)
    assert "4 shards built" in built.output
    result = runner.invoke(main, ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--augment", "paper", "--targets", "views", "--out", str(tmp_path / "run"), *common], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert record["targets"] == "views" and record["view_cache"]["dtype"] == "float16"
    assert sorted(record["view_cache"]["keys"]) == sorted(p.parent.name for p in (PredictionCache().root / "views").glob("*/meta.json"))


def test_dp_routes_on_full_precision_even_from_float16_logits(tmp_path):
    """Teacher and original student nearly tie on every sample: float16 logits alone would scramble the routing."""
    transfer_set, pre = data(), Preprocess((0.5,), (0.5,), (12, 12))
    original = model(0, "original")
    teacher_module = SmallNet(0)
    with torch.no_grad():  # the same network, its logits shifted by a hair in a random direction
        teacher_module.body[3].bias.add_(torch.randn(10, generator=torch.Generator().manual_seed(1)) * 1e-4)
    teacher = Model(teacher_module, "teacher", pre)
    source = ViewCachedTargets.for_transfer(tmp_path, [teacher], original, transfer_set, pre, "paper", 3, "float16")
    source.ensure(1)
    index = torch.arange(len(transfer_set))
    batch = source.get(index, torch.zeros(len(index), 1, 12, 12), epoch=0)
    labels = transfer_set.labels
    from ktransfer.methods.kl import route

    exact = route(source.original.views_logits(index, 0), source.teachers[0].views_logits(index, 0).unsqueeze(0), labels)
    rounded = route(batch.original_logits, batch.teacher_logits, labels)
    assert not torch.equal(rounded, exact)  # the rounding does flip near-ties here
    assert torch.equal(route(batch.original_logits, batch.teacher_logits, labels, confidence=batch.routing_confidence), exact)
    assert torch.equal(route(batch.original_logits, batch.teacher_logits, None, confidence=batch.routing_confidence),
                       route(source.original.views_logits(index, 0), source.teachers[0].views_logits(index, 0).unsqueeze(0), None))


def test_top_k_cache_keeps_the_k_largest_and_renormalises(tmp_path):
    transfer_set, pre = data(), Preprocess((0.5,), (0.5,), (12, 12))
    full = ViewCache(tmp_path, model(1, "teacher"), transfer_set, pre, seed=3, dtype="float32")
    top = ViewCache(tmp_path, model(1, "teacher"), transfer_set, pre, seed=3, dtype="float32", top_k=3)
    full.build(0), top.build(0)
    assert top.folder != full.folder and top.nbytes() < full.nbytes()
    index = torch.tensor([0, 17, 95])
    exact, read = full.logits(index, 0), top.logits(index, 0)
    kept = exact.topk(3, dim=1).indices
    assert torch.equal(read.gather(1, kept), exact.gather(1, kept))
    probs = read.softmax(dim=1)
    renormalised = exact.gather(1, kept).softmax(dim=1)
    assert torch.allclose(probs.gather(1, kept), renormalised) and float(probs.sum(1).sub(1).abs().max()) < 1e-6
    assert float(probs.sum(1).sub(probs.gather(1, kept).sum(1)).max()) == 0.0  # no mass outside the top 3


def test_kl_with_top_k_reads_a_top_k_cache_exactly(tmp_path):
    transfer_set, eval_set = data(), data(40, seed=1)
    settings = {**SETTINGS, "method": "kl", "top_k": 3}
    online = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="online", **settings)
    cached = ktransfer.transfer(model(0, "student"), model(1, "teacher"), transfer_set, eval_set, targets="views", cache_dtype="float32", cache_top_k=3, cache=PredictionCache(tmp_path), **settings)
    assert all(torch.equal(a, b) for a, b in zip(weights(online).values(), weights(cached).values()))
    assert cached.metrics["view_cache"]["top_k"] == 3


BUILDER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_view_cache import data, model
from ktransfer.models.base import Preprocess
from ktransfer.view_cache import ViewCache
cache = ViewCache({root!r}, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3)
original = cache.views_logits
def slow(*args, **kwargs):  # long enough that both processes reach the shard before either has written it
    time.sleep(1.0)
    return original(*args, **kwargs)
cache.views_logits = slow
while time.time() < {start}:
    time.sleep(0.01)
print(cache.build(0))
"""


def test_processes_building_one_shard_at_once_compute_it_once(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = BUILDER.format(tests=str(Path(__file__).parent), root=str(tmp_path), start=time.time() + 4)
    workers = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(worker.communicate(timeout=60)[0].strip() for worker in workers)
    assert outputs == ["False", "True"]
    assert len(list(tmp_path.glob("views/*/epoch-0000/confidence.npy"))) == 1 and not list(tmp_path.glob("views/*/.epoch-*.tmp"))


def test_check_of_a_top_k_cache_compares_the_kept_classes(tmp_path):
    cache = ViewCache(tmp_path, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3, top_k=3)
    cache.build(0)
    assert cache.check(samples=32)[0]["ok"] is True
    values = np.load(cache.shard(0) / "top_values.npy")
    values[4, 0] -= 2.0
    np.save(cache.shard(0) / "top_values.npy", values)
    damaged = ViewCache(tmp_path, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3, top_k=3)
    assert damaged.check(samples=96)[0]["ok"] is False


def test_a_method_top_k_above_the_caches_is_refused(tmp_path):
    from ktransfer.api import view_storage
    from ktransfer.methods import create_method

    transfer_set, eval_set = data(), data(40, seed=1)
    settings = {**SETTINGS, "method": "kl", "targets": "views", "cache": PredictionCache(tmp_path)}
    with pytest.raises(ConfigError, match=r"method kl has top_k 5 but the view cache keeps only each view's 3 largest logits, so it would pick 2 classes among tied ones"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, top_k=5, cache_top_k=3, **settings)
    assert not (tmp_path / "views").exists()  # refused before any work
    kl = lambda k: create_method("kl", top_k=k)  # noqa: E731
    # At most the cache's k, every class (0 or at least C), or a cache that kept every class: exact, allowed.
    assert view_storage("views", None, 3, kl(3), 10) == ("float16", 3)
    assert view_storage("views", "float32", 3, kl(2), 10) == ("float32", 3)
    assert view_storage("views", None, 3, kl(0), 10) == view_storage("views", None, 3, kl(10), 10) == ("float16", 3)
    assert view_storage("views", None, 10, kl(5), 10) == ("float16", 10)
    assert view_storage("views", None, None, kl(5), 10) == ("float16", 0)
    with pytest.raises(ConfigError, match="top_k 9 but"):
        view_storage("views", None, 3, kl(9), 10)


def test_margin_routing_needs_a_view_cache_of_exact_logits(tmp_path):
    from ktransfer.api import view_storage
    from ktransfer.methods import create_method

    transfer_set, eval_set = data(), data(40, seed=1)
    settings = {**SETTINGS, "method": "kl_dp_margin", "targets": "views", "cache": PredictionCache(tmp_path)}
    with pytest.raises(ConfigError, match=r"method kl_dp_margin routes by margin, which a view cache keeps only approximately \(its logits are float16\): use targets online, or a view cache with cache_dtype float32"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, **settings)
    assert not (tmp_path / "views").exists()  # refused before any work
    margin = create_method("kl_dp", routing="margin")
    with pytest.raises(ConfigError, match=r"float32, top 3 only\)"):
        view_storage("views", "float32", 3, margin, 10)
    assert view_storage("views", "float32", 10, margin, 10) == ("float32", 10)  # a top-k of every class is every class
    assert view_storage("views", "float32", None, margin, 10) == ("float32", 0)
    assert view_storage("online", None, None, margin, 10) == ("float16", 0)  # online targets: exact logits, nothing stored


def test_cache_storage_options_without_views_are_refused_not_ignored(tmp_path):
    transfer_set, eval_set = data(), data(40, seed=1)
    for options, named in (({"cache_top_k": 3}, "cache_top_k"), ({"cache_dtype": "float32"}, "cache_dtype"), ({"cache_dtype": "float16", "cache_top_k": 0}, "cache_dtype and cache_top_k")):
        with pytest.raises(ConfigError, match=rf"^{named} \(--cache-dtype, --cache-top-k\) set how targets views stores the frozen outputs, but this run's targets are online"):
            ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, epochs=1, augment="paper", targets="online", **options)
    with pytest.raises(ConfigError, match="this run's targets are cached"):
        ktransfer.transfer(model(0, "s"), model(1, "t"), transfer_set, eval_set, epochs=1, cache_top_k=3)


def test_cli_refuses_cache_options_without_targets_views(tmp_path, small_fashion_mnist, tiny_zoo):
    runner = CliRunner()
    common = ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--augment", "paper", "--epochs", "1", "--data-dir", str(small_fashion_mnist)]
    result = runner.invoke(main, [*common, "--cache-top-k", "3", "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith("Error: cache_top_k (--cache-dtype, --cache-top-k) set how targets views"), result.output
    result = runner.invoke(main, [*common, "--targets", "online", "--cache-dtype", "float32", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "but this run's targets are online" in result.output
    result = runner.invoke(main, [*common, "--targets", "views", "--cache-top-k", "3", "--method", "kl", "--param", "top_k=5", "--out", str(tmp_path / "c")])
    assert result.exit_code != 0 and "has top_k 5 but the view cache keeps only each view's 3" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "c" / "results.jsonl").exists()
    # With several teachers the same settings hold: a soup's ingredients read their views from a top-3 cache,
    result = runner.invoke(main, [*common, "--teacher", "zoo:vit", "--strategy", "soup", "--targets", "views", "--cache-top-k", "3", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    (soup,) = [json.loads(line) for line in (tmp_path / "d" / "results.jsonl").read_text().splitlines()]
    assert [(i["targets"], i["view_cache"]["top_k"]) for i in soup["ingredients"]] == [("views", 3), ("views", 3)]
    # and a sequential run, whose later stages retain toward a student not kept on disk, is refused with views in one line.
    result = runner.invoke(main, [*common, "--teacher", "zoo:vit", "--strategy", "sequential", "--targets", "views", "--out", str(tmp_path / "e")])
    assert result.exit_code != 0 and "use targets online with the sequential strategy" in result.output


def test_the_key_follows_the_code_that_makes_the_views(tmp_path, monkeypatch):
    import inspect
    from pathlib import Path

    import ktransfer.augment
    from ktransfer import view_cache

    transfer_set, pre, teacher = data(), Preprocess((0.5,), (0.5,), (12, 12)), model(1, "teacher")
    built = ViewCache(tmp_path, teacher, transfer_set, pre, seed=3)
    built.build(0)
    real = inspect.getsource

    def edited(edit):  # the source as it reads once the file is edited
        return lambda obj: edit(real(obj)) if obj in (ktransfer.augment, Preprocess.frame) else real(obj)

    for edit in (lambda text: text.replace("SHIFT_FRACTION = 0.1", "SHIFT_FRACTION = 0.2"), lambda text: text.replace("crop_pct", "crop_share")):
        with monkeypatch.context() as patch:
            patch.setattr(inspect, "getsource", edited(edit))
            after = ViewCache(tmp_path, teacher, transfer_set, pre, seed=3)
            assert after.folder != built.folder and not after.has(0)  # the old views are not read
    assert ViewCache(tmp_path, teacher, transfer_set, pre, seed=3).has(0)  # the same code reads them again
    # What is hashed is augment.py as it is on disk, then the frame's code.
    source = view_cache.recipe_source()
    assert source.startswith(Path(ktransfer.augment.__file__).read_text()) and "def frame(self, images" in source
    assert json.loads((built.folder / "meta.json").read_text())["recipe"] == view_cache.recipe_digest()


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor, self.num_classes = inner, factor, 10

    def forward(self, x):
        return self.inner(x) * self.factor


def test_logits_beyond_float16s_range_are_refused_not_stored_as_infinite(tmp_path):
    transfer_set, pre = data(), Preprocess((0.5,), (0.5,), (12, 12))
    loud = Model(Scaled(SmallNet(1), 1e6), "loud", pre)
    full = ViewCache(tmp_path, loud, transfer_set, pre, seed=3, dtype="float32")
    full.build(0)
    largest = float(full.logits(torch.arange(len(transfer_set)), 0).abs().max())
    assert largest > 65504 and float(full.logits(torch.arange(len(transfer_set)), 0).abs().topk(3, dim=1).values.min()) > 65504
    for top_k in (0, 3):  # every class, and only the 3 largest (which overflow too)
        half = ViewCache(tmp_path, loud, transfer_set, pre, seed=3, top_k=top_k)
        with pytest.raises(ViewCacheError, match=r"^loud's logits on the views of epoch 1 reach .* beyond what float16 holds \(±65504\), so they would be stored as infinite; cache them as float32"):
            half.build(0)
        assert not half.has(0) and not (half.folder / "meta.json").exists()
    with pytest.raises(ViewCacheError, match="beyond what float16 holds"):  # and from a transfer
        ktransfer.transfer(model(0, "student"), loud, transfer_set, data(40, seed=1), targets="views", cache=PredictionCache(tmp_path), **SETTINGS)


def test_shard_files_are_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    events = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.fstat(descriptor).st_ino))
        real_fsync(descriptor)

    def renamer(real):
        def rename(source, target):
            events.append(("rename", os.stat(source).st_ino, Path(target)))
            real(source, target)
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    cache = ViewCache(tmp_path, model(1, "teacher"), data(), Preprocess((0.5,), (0.5,), (12, 12)), seed=3, top_k=3)
    cache.build(0)

    def synced(start, stop):
        return {event[1] for event in events[start:stop] if event[0] == "fsync"}

    renames = {event[2]: (at, event[1]) for at, event in enumerate(events) if event[0] == "rename"}
    # The shard: each of its files and its folder synced before the folder is renamed into place,
    # the cache's folder (which records the rename) after.
    at, folder = renames[cache.shard(0)]
    files = sorted(cache.shard(0).iterdir())
    assert [f.name for f in files] == ["classes.npy", "confidence.npy", "top_classes.npy", "top_values.npy"]
    assert {f.stat().st_ino for f in files} | {folder} <= synced(0, at)
    assert cache.folder.stat().st_ino in synced(at + 1, len(events))
    # meta.json goes through paths.atomic_path: the file before its rename, the folder after.
    at, meta = renames[cache.folder / "meta.json"]
    assert meta == (cache.folder / "meta.json").stat().st_ino and meta in synced(0, at)
    assert cache.folder.stat().st_ino in synced(at + 1, renames[cache.shard(0)][0])


def test_a_streamed_folder_caches_the_same_views_as_the_folder_in_memory(tmp_path):
    from folder_helpers import write_image_folder
    from ktransfer.data.folder import FolderImageData, load_folder, scan_folder

    listing = scan_folder(write_image_folder(tmp_path / "images", per_class=6))
    memory = load_folder(listing, 16, workers=0, in_memory=True)
    stream = load_folder(listing, 16, workers=0, in_memory=False)
    assert isinstance(stream, FolderImageData) and not isinstance(memory, FolderImageData)
    pre = Preprocess((0.5,) * 3, (0.5,) * 3, (12, 12))

    def rgb(seed: int, name: str) -> Model:
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 3))
        module.num_classes = 3
        return Model(module, name, pre)

    index = torch.arange(len(listing))
    for top_k in (0, 2):
        caches = [ViewCache(tmp_path / "cache", rgb(1, "teacher"), images, pre, seed=3, dtype="float32", top_k=top_k) for images in (memory, stream)]
        assert caches[0].folder != caches[1].folder  # the data's fingerprints differ (pixels, files)
        for epoch in (0, 1):
            assert [cache.build(epoch, batch_size=8) for cache in caches] == [True, True]  # 18 images: batches of 8, 8, 2
            held, streamed = (cache.logits(index, epoch) for cache in caches)
            assert torch.equal(held, streamed) and torch.equal(caches[0].confidence(index, epoch), caches[1].confidence(index, epoch))
        assert not torch.equal(caches[1].logits(index, 0), caches[1].logits(index, 1))  # each epoch its own views
        assert all(result["ok"] for result in caches[1].check(samples=5).values())
    # A transfer with views on the streamed folder trains as the one on the folder in memory.
    settings = dict(method="kl_dp", epochs=2, lr=0.05, batch_size=8, augment="paper", seed=3, targets="views", cache_dtype="float32", cache=PredictionCache(tmp_path / "cache"))
    held, streamed = (ktransfer.transfer(rgb(0, "student"), rgb(1, "teacher"), images, images, **settings) for images in (memory, stream))
    assert streamed.metrics["targets"] == "views" and streamed.metrics["n_transfer"] == len(listing)
    for key, value in weights(held).items():
        assert torch.equal(value, weights(streamed)[key]), key
