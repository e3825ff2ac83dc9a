"""The no-regression guard: the best of the original and each epoch's student on data it never trained on."""

import pytest
import torch

import ktransfer
import ktransfer.api as api
from ktransfer.data.base import ImageData, stratified_split
from ktransfer.errors import ConfigError
from ktransfer.models.zoo import MLP

from conftest import make_images
from folder_helpers import TINY_NETS

NAMES = [f"class{i}" for i in range(10)]


def fresh_mlp(seed: int):
    torch.manual_seed(seed)
    return MLP(hidden=32)


def states_equal(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


class SeenData:
    """Records the transfer set every engine trains on."""

    def __init__(self, monkeypatch):
        self.sets = []
        original = api.Engine

        def engine(student, method, data, *args, **kwargs):
            self.sets.append(data)
            return original(student, method, data, *args, **kwargs)

        monkeypatch.setattr(api, "Engine", engine)


def test_a_learning_student_returns_its_best_epoch_and_that_epochs_eval_metrics(tiny_data):
    transfer_set, eval_set = tiny_data
    result = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="ce", epochs=3, lr=0.05, guard=True)
    m = result.metrics
    guard_accs = [record["guard_acc"] for record in result.history]
    assert m["guard_source"] == "holdout" and m["guard_size"] == round(0.1 * len(transfer_set)) and m["guard_holdout"] == 0.1
    assert m["guard_epoch"] >= 1 and m["guard_acc_after"] == max(guard_accs) > m["guard_acc_before"]
    assert guard_accs.index(max(guard_accs)) + 1 == m["guard_epoch"]  # the earliest of equal bests
    chosen = result.history[m["guard_epoch"] - 1]
    for key in ("acc_after", "delta", "knowledge_gain", "knowledge_loss", "p_value"):
        assert m[key] == pytest.approx(chosen[key])
        assert m["last_epoch"][key] == pytest.approx(result.history[-1][key])
    # The returned weights give those numbers.
    predictions = ktransfer.api.Evaluator(eval_set)(result.model)
    assert predictions["acc"] == pytest.approx(m["acc_after"])
    assert float((result.predictions == eval_set.labels).float().mean() * 100) == pytest.approx(m["acc_after"])


def trained_student(tiny_data):
    transfer_set, eval_set = tiny_data
    return ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="ce", epochs=3, lr=0.05).student


def test_the_original_is_kept_when_every_epoch_is_worse_on_held_out_data(tiny_data):
    transfer_set, eval_set = tiny_data
    student = trained_student(tiny_data)
    # Pure KL toward an untrained teacher at a huge learning rate: every epoch forgets.
    result = ktransfer.transfer(student, fresh_mlp(7), transfer_set, eval_set, method="kl", epochs=2, lr=1.0, guard=True)
    m = result.metrics
    assert all(record["guard_acc"] < m["guard_acc_before"] for record in result.history)
    assert m["guard_epoch"] == 0 and m["guard_acc_after"] == m["guard_acc_before"]
    assert states_equal(result.student, student)
    assert m["acc_after"] == m["acc_before"] and m["delta"] == 0 and m["knowledge_loss"] == 0
    assert m["last_epoch"]["delta"] < 0
    without = ktransfer.transfer(student, fresh_mlp(7), transfer_set, eval_set, method="kl", epochs=2, lr=1.0)
    assert "guard_epoch" not in without.metrics and without.metrics["delta"] < 0


def test_the_choice_does_not_depend_on_the_evaluation_labels(tiny_data):
    transfer_set, eval_set = tiny_data
    shuffled = ImageData(eval_set.images, eval_set.labels[torch.randperm(len(eval_set), generator=torch.Generator().manual_seed(3))], NAMES, "tiny/eval-shuffled")
    runs = [ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, evaluation, method="ce", epochs=3, lr=0.05, guard=True) for evaluation in (eval_set, shuffled)]
    assert runs[0].metrics["guard_epoch"] == runs[1].metrics["guard_epoch"]
    assert [r["guard_acc"] for r in runs[0].history] == [r["guard_acc"] for r in runs[1].history]
    assert states_equal(runs[0].student, runs[1].student)
    assert runs[0].metrics["acc_after"] != runs[1].metrics["acc_after"]  # the evaluation did see other labels


def test_held_out_samples_are_never_trained_on(tiny_data, monkeypatch):
    transfer_set, eval_set = tiny_data
    seen = SeenData(monkeypatch)
    result = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="kl_dp", epochs=1, seed=5, guard=True, guard_holdout=0.25)
    (trained_on,) = seen.sets
    held_out, kept = stratified_split(transfer_set.labels, 96, seed=5)
    assert len(trained_on) == len(kept) == 288 and result.metrics["guard_size"] == 96
    assert torch.equal(trained_on.images, transfer_set.images[kept]) and torch.equal(trained_on.labels, transfer_set.labels[kept])
    rows = {bytes(image.numpy().tobytes()) for image in trained_on.images}
    assert not any(bytes(image.numpy().tobytes()) in rows for image in transfer_set.images[held_out])
    assert result.metrics["n_transfer"] == 288


def test_with_val_data_no_holdout_is_taken(tiny_data, monkeypatch):
    transfer_set, eval_set = tiny_data
    validation = ImageData(*make_images(100, seed=9), NAMES, "tiny/val")
    seen = SeenData(monkeypatch)
    result = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="kl_dp", epochs=1, guard=True, val_data=validation)
    assert seen.sets[0] is transfer_set or torch.equal(seen.sets[0].images, transfer_set.images)
    m = result.metrics
    assert m["guard_source"] == "val_data" and m["guard_size"] == 100 and "guard_holdout" not in m and m["n_transfer"] == len(transfer_set)


def test_a_holdout_guard_warns_that_it_is_weak(tiny_data):
    lines = []
    ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, method="kl_dp", epochs=1, guard=True, log=lines.append)
    assert any(line.startswith("Warning") and "weak guard" in line for line in lines)


def test_guard_is_off_by_default_and_its_options_are_checked(tiny_data):
    result = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, method="kl_dp", epochs=1)
    assert not any(key.startswith("guard") for key in result.metrics) and "guard_acc" not in result.history[0]
    with pytest.raises(ConfigError, match="guard=True"):
        ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, epochs=1, val_data=tiny_data[1])
    with pytest.raises(ConfigError, match="guard_holdout"):
        ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, epochs=1, guard=True, guard_holdout=1.5)


def test_mcl_keeps_the_evaluated_modules_best_weights(tiny_data):
    transfer_set, eval_set = tiny_data
    student = trained_student(tiny_data)
    result = ktransfer.transfer(student, fresh_mlp(7), transfer_set, eval_set, method="xe_kl_mcl", epochs=2, lr=1.0, guard=True)
    m = result.metrics
    best = max([m["guard_acc_before"], *(r["guard_acc"] for r in result.history)])
    assert m["guard_acc_after"] == best
    assert ktransfer.api.Evaluator(eval_set)(result.model)["acc"] == pytest.approx(m["acc_after"])
    if m["guard_epoch"] == 0:
        assert states_equal(result.student, student)


class Stop(Exception):
    pass


def stop_at(step_to_stop):
    def on_step(step, total):
        if step == step_to_stop:
            raise Stop()
    return on_step


def test_a_resumed_guarded_run_returns_what_an_uninterrupted_one_does(tiny_data, tmp_path):
    settings = dict(method="ce", epochs=3, lr=0.05, guard=True)
    whole = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, **settings)
    folder = tmp_path / "checkpoints"
    # 346 training images, 3 batches an epoch: stop in the middle of epoch 3, after epochs 1 and 2 were scored.
    with pytest.raises(Stop):
        ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, checkpoint_dir=folder, checkpoint_every=1, on_step=stop_at(8), **settings)
    resumed = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), *tiny_data, checkpoint_dir=folder, **settings)
    for key in ("guard_epoch", "guard_acc_before", "guard_acc_after", "acc_after", "delta"):
        assert resumed.metrics[key] == whole.metrics[key]
    assert [r["guard_acc"] for r in resumed.history] == [r["guard_acc"] for r in whole.history]
    assert states_equal(resumed.student, whole.student)


def cli(*args):
    from click.testing import CliRunner

    from ktransfer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_guard_on_fashion_mnist_scores_on_its_validation_split(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import read_records

    out = tmp_path / "run"
    result = cli("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "kl_dp", "--epochs", "2", "--lr", "1e-3", "--guard", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert record["guard_source"] == "val_data" and record["guard_size"] == 200 and record["n_transfer"] == 100
    assert all("guard_acc" in epoch for epoch in record["history"]) and "last_epoch" in record
    assert "guard (val_data, 200 images): kept" in result.output and "weak guard" not in result.output


def test_cli_guard_holds_out_transfer_data_when_it_trains_on_the_validation_split(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import read_records

    out = tmp_path / "run"
    result = cli("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--epochs", "1", "--guard", "--guard-holdout", "0.2", "--transfer-data", "fashion-mnist:validation", "--eval-data", "fashion-mnist:test", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert record["guard_source"] == "holdout" and record["guard_size"] == 40 and record["n_transfer"] == 160 and record["guard_holdout"] == 0.2
    assert "weak guard" in result.output


def test_cli_guard_options_are_checked(small_fashion_mnist, tiny_zoo, tmp_path):
    out = tmp_path / "run"
    base = ("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--out", out, "--data-dir", small_fashion_mnist)
    for extra, message in (
        (("--val-data", "fashion-mnist:validation"), "add --guard"),
        (("--guard", "--val-data", "fashion-mnist:test", "--eval-data", "fashion-mnist:test", "--transfer-data", "fashion-mnist:transfer"), "is the evaluation data"),
        (("--guard", "--guard-holdout", "0.2"), "leave out one of them"),
    ):
        result = cli(*base, *extra)
        assert result.exit_code != 0 and message in result.output, result.output


def test_demo_guard_scores_on_the_validation_split_and_reuses_only_guarded_runs(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import read_records

    out = tmp_path / "demo"
    args = ["demo", "--executor", "local", "--students", "cnn", "--teachers", "mlp", "--methods", "kl_dp", "--epochs", "2", "--out", out, "--data-dir", small_fashion_mnist]
    plain = cli(*args)
    assert plain.exit_code == 0, plain.output
    guarded = cli(*args, "--guard")
    assert guarded.exit_code == 0, guarded.output
    assert "reused" not in guarded.output  # a guarded run is not the unguarded one
    records = read_records(out / "results.jsonl")
    assert len(records) == 3 and {r["method"] for r in records} == {"ce", "self", "kl_dp"}
    for record in records:  # the controls are guarded too, so the comparisons stay like with like
        assert record["guard_source"] == "val_data" and record["guard_size"] == 200 and 0 <= record["guard_epoch"] <= 2
    assert "guard: " in guarded.output
    again = cli(*args, "--guard")
    assert again.exit_code == 0 and "reused 3 finished runs" in again.output


def test_demo_guard_in_the_new_data_setting_holds_out_a_share(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import read_records

    out = tmp_path / "new"
    result = cli("demo", "--executor", "local", "--setting", "new-data", "--students", "mlp", "--teachers", "cnn", "--methods", "kl_dp", "--no-controls", "--epochs", "1", "--guard", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    (record,) = read_records(out / "results.jsonl")
    assert record["guard_source"] == "holdout" and record["guard_size"] == 20 and record["n_transfer"] == 180
    assert record["transfer_data"] == "fashion-mnist/validation"


def test_cli_guard_with_controls_guards_them_too(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import read_records

    out = tmp_path / "run"
    result = cli("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--method", "kl", "--epochs", "1", "--lr", "1e-2", "--guard", "--controls", "--out", out, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    records = read_records(out / "results.jsonl")
    assert [r["method"] for r in records] == ["ce", "self", "kl"] and all(r["guard_source"] == "val_data" for r in records)


# ---------------------------------------------------------------- the guard never chooses on the evaluation data


def test_the_api_refuses_val_data_that_is_or_overlaps_the_evaluation_data(tiny_data, monkeypatch):
    transfer_set, eval_set = tiny_data
    fresh = ImageData(*make_images(100, seed=9), NAMES, "tiny/val")
    copy = ImageData(eval_set.images.clone(), eval_set.labels.clone(), NAMES, "tiny/eval-copy")  # another name, another fingerprint
    part = eval_set.subset(torch.arange(0, 256, 4), "tiny/eval-quarter")
    mixed = ImageData(torch.cat([fresh.images[:90], eval_set.images[:10]]), torch.cat([fresh.labels[:90], eval_set.labels[:10]]), NAMES, "tiny/val-mixed")
    seen = SeenData(monkeypatch)
    for val_data, message in (
        (eval_set, "validation data tiny/eval is the evaluation data tiny/eval (all 256 samples)"),
        (copy, "tiny/eval-copy is the evaluation data tiny/eval"),
        ((eval_set.images.clone(), eval_set.labels.clone()), "is the evaluation data tiny/eval"),  # the same samples as plain tensors
        (part, "tiny/eval-quarter lies inside the evaluation data tiny/eval (all its 64 samples"),
        (mixed, "tiny/val-mixed shares 10 of its 100 samples with the evaluation data tiny/eval"),
    ):
        with pytest.raises(ConfigError) as refused:
            ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="kl_dp", epochs=1, guard=True, val_data=val_data)
        assert message in str(refused.value)
        assert "fashion-mnist:validation" in str(refused.value) and "leave out val_data (--val-data)" in str(refused.value)
    assert seen.sets == []  # refused before any training
    # The guard's data is checked against the evaluation data, not against the transfer data it does not train on.
    result = ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), transfer_set, eval_set, method="kl_dp", epochs=1, guard=True, val_data=fresh)
    assert result.metrics["guard_source"] == "val_data" and result.metrics["guard_size"] == 100


def test_a_guard_holdout_of_transfer_data_that_overlaps_the_evaluation_data_is_refused(tiny_data):
    transfer_set, eval_set = tiny_data
    with pytest.raises(ConfigError, match=r"guard's holdout tiny/eval \(guard holdout\) lies inside the evaluation data tiny/eval.*give val_data \(--val-data\)"):
        ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), eval_set, eval_set, method="kl_dp", epochs=1, guard=True)
    both = ImageData(torch.cat([transfer_set.images, eval_set.images]), torch.cat([transfer_set.labels, eval_set.labels]), NAMES, "tiny/both")
    with pytest.raises(ConfigError, match=r"tiny/both \(guard holdout\) shares \d+ of its 64 samples with the evaluation data"):
        ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), both, eval_set, method="kl_dp", epochs=1, guard=True)
    # Without the guard nothing chooses on the evaluation data: training on it is the user's call.
    ktransfer.transfer(fresh_mlp(0), fresh_mlp(1), eval_set, eval_set, method="kl_dp", epochs=1)


def test_every_spelling_of_the_evaluation_folder_is_refused_streamed_or_in_memory(tmp_path):
    from folder_helpers import write_image_folder, write_split_folder
    from ktransfer.data.folder import load_folder
    from ktransfer.data.sources import open_data, open_split

    root = write_split_folder(tmp_path / "imgs", train_per_class=4, val_per_class=3)
    (tmp_path / "link").symlink_to(root / "val", target_is_directory=True)
    part = tmp_path / "part"  # two of the evaluation images, linked into a folder of their own
    for name in ("blue", "red"):
        (part / name).mkdir(parents=True)
        first = sorted((root / "val" / name).iterdir())[0]
        (part / name / first.name).symlink_to(first)
    (part / "green").mkdir()
    write_image_folder(tmp_path / "other", per_class=2, seed=77, classes=("green",))
    (part / "green" / "other.png").symlink_to(next((tmp_path / "other" / "green").iterdir()))
    transfer, evaluation = open_data(f"folder:{root}")

    def load(listing, streamed):
        return load_folder(listing, 12, workers=0, in_memory=not streamed)

    spellings = [f"folder:{root}/val", f"folder:{root}/val/", f"folder:{root}/train/../val", f"folder:{tmp_path}/link"]
    for eval_streamed, val_streamed in ((False, False), (True, True), (True, False), (False, True)):
        eval_set, transfer_set = load(evaluation, eval_streamed), load(transfer, eval_streamed)
        for spec in spellings:
            val_set = load(open_split(spec, "eval", transfer.class_names), val_streamed)
            with pytest.raises(ConfigError, match="is the evaluation data"):
                api.guard_data(True, val_set, 0.1, transfer_set, 0, eval_set=eval_set)
        val_set = load(open_split(f"folder:{part}", "eval", transfer.class_names), val_streamed)
        with pytest.raises(ConfigError, match="shares 2 of its 3 samples with the evaluation data"):
            api.guard_data(True, val_set, 0.1, transfer_set, 0, eval_set=eval_set)
        disjoint = load(open_split(f"folder:{root}/train", "eval", transfer.class_names), val_streamed)
        assert api.guard_data(True, disjoint, 0.1, transfer_set, 0, eval_set=eval_set)[2] == "val_data"


def test_cli_refuses_the_evaluation_set_as_val_data_by_every_spelling(small_fashion_mnist, tiny_zoo, tmp_path):
    base = ("transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--epochs", "1", "--guard", "--data-dir", small_fashion_mnist)
    cases = [
        # The default evaluation data is Fashion-MNIST's test split; a bare fashion-mnist read as evaluation data is that split too.
        ((), "fashion-mnist", "is the evaluation data"),
        ((), "fashion-mnist:test", "is the evaluation data"),
        ((), "Fashion-MNIST:test", "is the evaluation data"),
        (("--data", "fashion-mnist"), "fashion-mnist", "is the evaluation data"),
        (("--eval-data", "fashion-mnist:test"), "fashion-mnist", "is the evaluation data"),
        (("--eval-data", "fashion-mnist:validation", "--transfer-data", "fashion-mnist:transfer"), "fashion-mnist:validation", "is the evaluation data"),
        ((), "fashion-mnist:eval", "got 'eval'"),  # not a part: refused by name
    ]
    for number, (data, val, message) in enumerate(cases):
        out = tmp_path / f"run{number}"
        result = cli(*base, *data, "--val-data", val, "--out", out)
        assert result.exit_code != 0 and message in result.output, (data, val, result.output)
        assert "fashion-mnist:validation" in result.output or message == "got 'eval'"
        assert not (out / "results.jsonl").exists() and "epoch 1" not in result.output


def test_cli_refuses_another_spelling_of_the_evaluation_folder(tmp_path, monkeypatch):
    from folder_helpers import write_split_folder

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "guardnets_k6.py").write_text(TINY_NETS)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    root = write_split_folder(tmp_path / "imgs", train_per_class=6, val_per_class=3)
    base = ("transfer", "--student", "guardnets_k6:make?input_size=12", "--teacher", "guardnets_k6:make?width=6&input_size=12", "--data", f"folder:{root}",
            "--epochs", "1", "--batch-size", "6", "--workers", "0", "--guard")
    for number, (val, extra) in enumerate(((f"folder:{root}/val/", ()), (f"folder:{root}/./val", ("--stream",)))):
        result = cli(*base, "--val-data", val, *extra, "--out", tmp_path / f"run{number}")
        assert result.exit_code != 0 and "is the evaluation data" in result.output, result.output
    ok = cli(*base, "--val-data", f"folder:{root}/train", "--out", tmp_path / "ok")  # other images: accepted (if a weak guard)
    assert ok.exit_code == 0, ok.output
