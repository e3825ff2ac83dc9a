"""Several teachers: parallel routing, sequential stages, weight soups and batch-norm recalibration."""

import math

import pytest
import torch
from torch import nn

import ktransfer
from ktransfer.data.base import ImageData
from ktransfer.engine import Engine, TrainConfig
from ktransfer.errors import ConfigError, ModelError
from ktransfer.methods import create_method
from ktransfer.methods.kl import KLDistDP
from ktransfer.metrics import accuracy
from ktransfer.models.base import Model
from ktransfer.models.zoo import MLP
from ktransfer.multi import average_state_dicts, average_weights, recalibrate_batch_norm, transfer_multi
from ktransfer.predictions import PredictionCache, compute_logits

from conftest import make_images


# ---------------------------------------------------------------- parallel, on crafted logits


class LookupLogits(nn.Module):
    """Logits read from a table by sample index; the index is the image's only pixel."""

    def __init__(self, table: torch.Tensor, trainable: bool = False):
        super().__init__()
        self.num_classes = table.shape[1]
        if trainable:
            self.table = nn.Parameter(table.clone())
        else:
            self.register_buffer("table", table.clone())

    def forward(self, x):
        return self.table[x.reshape(len(x), -1)[:, 0].round().long()]


# Three classes, six samples. Rows: the original student, teacher 1, teacher 2.
LABELS = torch.tensor([0, 1, 2, 0, 1, 0])
ORIGINAL = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 4], [2, 0, 0], [0, 0, 0], [2, 0, 0]])
TEACHER_1 = torch.tensor([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [2, 0, 0], [0, 3, 0], [0, 0, 0]])
TEACHER_2 = torch.tensor([[1.0, 0, 0], [0, 4, 0], [2, 0, 0], [1, 0, 0], [0, 3, 0], [0, 0, 6]])
# By hand, probability of the true class (supervised):
#   0: 1/3 < 0.91 (t1) > 0.58 (t2)            -> teacher 1
#   1: 0.58 < 0.79 < 0.96 (t2)                -> teacher 2
#   2: 0.96 (original) > 0.58, 0.11           -> original
#   3: original and teacher 1 tie at 0.79     -> original (ties go to the original)
#   4: teachers 1 and 2 tie at 0.91 > 1/3     -> teacher 1 (ties go to the earlier teacher)
#   5: 0.79 (original) > 1/3 > 0.0025         -> original
# Unsupervised (maximum probability) differs only on sample 5: teacher 2 is sure (0.995), but of the wrong class.
ROUTED_SUPERVISED = [1, 2, 0, 0, 1, 0]
ROUTED_UNSUPERVISED = [1, 2, 0, 0, 1, 2]


def crafted_data():
    images = torch.arange(len(LABELS), dtype=torch.float32).view(-1, 1, 1, 1)
    return ImageData(images, LABELS, ["a", "b", "c"], "crafted")


@pytest.mark.parametrize("supervised, routed", [(True, ROUTED_SUPERVISED), (False, ROUTED_UNSUPERVISED)])
def test_parallel_routes_each_sample_to_the_most_confident_model(supervised, routed):
    data = crafted_data()
    student = LookupLogits(ORIGINAL, trainable=True)
    teachers = [LookupLogits(TEACHER_1), LookupLogits(TEACHER_2)]
    lr = 0.5
    result = transfer_multi(
        student, teachers, data, data, "kl_dp", strategy="parallel", supervised=supervised,
        epochs=1, lr=lr, batch_size=len(data), momentum=0.0, weight_decay=0.0,
    )
    m = result.metrics
    assert m["strategy"] == "parallel" and m["teachers"] == ["teacher1", "teacher2"] and m["teacher"] == "teacher1+teacher2"
    expected_shares = [routed.count(k) / len(routed) for k in range(3)]
    assert list(m["routed_shares"].values()) == pytest.approx(expected_shares)
    assert list(m["routed_shares"]) == ["original", "teacher1", "teacher2"]
    assert m["teacher_share"] == pytest.approx(1 - expected_shares[0])
    # One full-batch SGD step on T²·KL(target ‖ student) moves each row by -lr/N·(σ(z) - σ(target)):
    # rows routed to the original (the student itself at the start) stay put.
    candidates = torch.stack([ORIGINAL, TEACHER_1, TEACHER_2])
    target = candidates[torch.tensor(routed), torch.arange(len(routed))]
    expected = ORIGINAL - lr / len(routed) * (ORIGINAL.softmax(-1) - target.softmax(-1))
    assert torch.allclose(result.student.table.detach(), expected, atol=1e-6)
    moved = (result.student.table.detach() - ORIGINAL).abs().amax(dim=1)
    assert ((moved > 1e-3) == (torch.tensor(routed) > 0)).all()
    assert torch.equal(student.table.detach(), ORIGINAL)  # the caller's student is untouched


def test_parallel_needs_a_data_partitioning_method():
    data = crafted_data()
    student, teachers = LookupLogits(ORIGINAL, True), [LookupLogits(TEACHER_1), LookupLogits(TEACHER_2)]
    with pytest.raises(ConfigError, match="needs a data-partitioning method"):
        transfer_multi(student, teachers, data, data, "kl", strategy="parallel")
    with pytest.raises(ConfigError, match="routing 'confidence'"):
        transfer_multi(student, teachers, data, data, "kl_dp", strategy="parallel", routing="teacher_on_positive_flips")
    with pytest.raises(ConfigError, match="strategy must be one of"):
        transfer_multi(student, teachers, data, data, "kl_dp", strategy="ensemble")
    with pytest.raises(ConfigError, match="sequential strategy only"):
        transfer_multi(student, teachers, data, data, "kl_dp", strategy="parallel", order="descending")
    with pytest.raises(ConfigError, match="more than once"):
        transfer_multi(student, [Model(teachers[0], "t", spec="zoo:t"), Model(teachers[1], "t", spec="zoo:t")], data, data, strategy="soup")


# ---------------------------------------------------------------- sequential


def pretrained(module, data, epochs, seed):
    torch.manual_seed(seed)
    Engine(Model(module, "m"), create_method("ce"), data, TrainConfig(epochs=epochs, lr=0.05, batch_size=64, seed=seed)).run()
    return module.eval()


@pytest.fixture(scope="module")
def models():
    # Module-scoped (trained once for the file) on the same images as the tiny_data fixture.
    transfer_set = ImageData(*make_images(384, seed=1), [f"class{i}" for i in range(10)], "tiny/transfer")
    torch.manual_seed(0)
    student = pretrained(MLP(hidden=32), transfer_set, 1, seed=1)
    weak = pretrained(MLP(hidden=32), transfer_set.subset(range(40), "tiny/few"), 1, seed=2)
    strong = pretrained(MLP(hidden=32), transfer_set, 3, seed=3)
    return student, strong, weak


class RecordingDP(KLDistDP):
    """KL+DP that remembers the retain targets it was given (a class attribute survives the per-stage copies)."""

    seen: list = []

    def loss(self, inputs):
        RecordingDP.seen.append((inputs.indices.clone(), inputs.original_logits.clone()))
        return super().loss(inputs)


def test_sequential_stages_restart_from_the_previous_student(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, strong, weak = models
    settings = dict(epochs=2, lr=0.02, batch_size=128, seed=0)
    accuracies = [accuracy(eval_set.labels, compute_logits(Model(t, "t"), eval_set).argmax(1)) for t in (strong, weak)]
    assert accuracies[1] < accuracies[0]
    RecordingDP.seen = []
    result = transfer_multi(student, [strong, weak], transfer_set, eval_set, RecordingDP(), strategy="sequential", **settings)
    m = result.metrics
    assert m["strategy"] == "sequential" and m["order"] == "ascending"
    assert m["stage_teachers"] == ["teacher2", "teacher1"]  # the weaker teacher first

    # Each stage equals a fresh transfer call from the previous stage's student: a fresh optimiser
    # (momentum carried over would change the weights) and the previous student as retain target.
    stage1 = ktransfer.transfer(student, weak, transfer_set, eval_set, method="kl_dp", **settings)
    stage2 = ktransfer.transfer(stage1.model, strong, transfer_set, eval_set, method="kl_dp", **settings)
    for key, value in stage2.student.state_dict().items():
        assert torch.equal(result.student.state_dict()[key], value), key
    steps = math.ceil(len(transfer_set) / settings["batch_size"]) * settings["epochs"]
    assert len(RecordingDP.seen) == 2 * steps
    for stage, start in enumerate((Model(student, "s"), stage1.model)):
        reference = compute_logits(start, transfer_set)
        for indices, original in RecordingDP.seen[stage * steps:(stage + 1) * steps]:
            assert torch.allclose(original, reference[indices], atol=1e-6)

    first, second = m["stages"]
    assert (first["stage"], first["teacher"], second["teacher"]) == (1, "teacher2", "teacher1")
    assert second["acc_before"] == pytest.approx(first["acc_after"])
    assert first["acc_before"] == pytest.approx(m["acc_before"])
    assert m["delta"] == pytest.approx(first["delta"] + second["delta"])  # the stages' deltas add up
    assert second["delta_vs_first"] == pytest.approx(m["delta"])
    # The combined history: epochs numbered across stages, metrics against the very first student
    # and, with the stage_ prefix, against the stage's start.
    history = m["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert [(h["stage"], h["stage_epoch"]) for h in history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for h in history:
        assert h["acc_before"] == pytest.approx(m["acc_before"])
        assert h["delta"] == pytest.approx(h["knowledge_gain"] - h["knowledge_loss"])
        assert h["delta"] == pytest.approx(h["acc"] - m["acc_before"])
        assert h["stage_delta"] == pytest.approx(h["acc"] - m["stages"][h["stage"] - 1]["acc_before"])
    assert history[-1]["acc"] == pytest.approx(m["acc_after"])
    assert m["total_epochs"] == 4 and m["epochs"] == 2


def test_sequential_orders_and_per_teacher_budgets(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, strong, weak = models
    common = dict(strategy="sequential", lr=0.01, cache=PredictionCache(enabled=False))
    descending = transfer_multi(student, [weak, strong], transfer_set, eval_set, "kl", order="descending", epochs=[1, 2], **common)
    assert descending.metrics["stage_teachers"] == ["teacher2", "teacher1"]
    assert descending.metrics["epochs"] == [2, 1]  # budgets travel with their teachers
    assert [h["stage"] for h in descending.metrics["history"]] == [1, 1, 2]
    given = transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", order="given", epochs=1, **common)
    assert given.metrics["stage_teachers"] == ["teacher1", "teacher2"]
    with pytest.raises(ConfigError, match="one epoch budget per teacher"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", epochs=[1, 2, 3], **common)
    with pytest.raises(ConfigError, match="at least 1"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", epochs=[1, 0], **common)


# ---------------------------------------------------------------- soup


def with_batch_norm(seed):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    norm = module[2]
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    norm.num_batches_tracked.fill_(5 + seed)
    return module


def test_soup_average_equals_a_hand_made_average():
    modules = [with_batch_norm(seed) for seed in range(3)]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    soup = average_weights(modules)
    for key, value in soup.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert int(value) == 5  # integer buffers come from the first ingredient
        else:
            assert torch.allclose(value, (states[0][key] + states[1][key] + states[2][key]) / 3, atol=1e-7), key
    for module, state in zip(modules, states):  # the ingredients are untouched
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    assert average_state_dicts([states[0]])["1.weight"].data_ptr() != states[0]["1.weight"].data_ptr()


def test_soup_needs_one_architecture():
    with pytest.raises(ModelError, match="one architecture"):
        average_weights([MLP(hidden=32), with_batch_norm(0)])
    with pytest.raises(ModelError, match="has shape"):
        average_weights([MLP(hidden=32), MLP(hidden=16)])


def test_soup_strategy_reuses_finished_ingredients(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, strong, weak = models
    student, strong, weak = Model(student, "s", spec="test:s"), Model(strong, "strong", spec="test:strong"), Model(weak, "weak", spec="test:weak")
    settings = dict(epochs=1, lr=0.02, seed=0)
    finished = ktransfer.transfer(student, strong, transfer_set, eval_set, method="kl", **settings)
    result = transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", strategy="soup", reuse=[finished], **settings)
    other = ktransfer.transfer(student, weak, transfer_set, eval_set, method="kl", **settings)
    expected = average_state_dicts([finished.student.state_dict(), other.student.state_dict()])
    for key, value in result.student.state_dict().items():
        assert torch.allclose(value, expected[key], atol=1e-7), key
    m = result.metrics
    assert m["strategy"] == "soup" and m["teachers"] == ["test:strong", "test:weak"] and m["reused_ingredients"] == 1
    assert [i["reused"] for i in m["ingredients"]] == [True, False]
    assert [i["teacher"] for i in m["ingredients"]] == ["test:strong", "test:weak"]
    assert m["acc_after"] == pytest.approx(accuracy(eval_set.labels, result.model.logits(eval_set.images).argmax(1)))
    assert m["delta"] == pytest.approx(m["knowledge_gain"] - m["knowledge_loss"])
    assert m["recalibrated_bn_layers"] == 0  # the MLP has no batch norm
    with pytest.raises(ConfigError, match="lr=0.02 but this soup uses 0.05"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", strategy="soup", reuse=[finished], epochs=1, lr=0.05)
    with pytest.raises(ConfigError, match="not among the teachers"):
        transfer_multi(student, [weak], transfer_set, eval_set, "kl", strategy="soup", reuse=[finished], **settings)
    with pytest.raises(ConfigError, match="augment='none' but this soup uses 'paper'"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", strategy="soup", reuse=[finished], augment="paper", **settings)
    older = ktransfer.TransferResult(finished.student, {k: v for k, v in finished.metrics.items() if k != "augment"})
    assert transfer_multi(student, [strong], transfer_set, eval_set, "kl", strategy="soup", reuse=[older], **settings).metrics["reused_ingredients"] == 1  # records from before augmentation existed


def test_several_teachers_with_augmentation(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, strong, weak = models
    result = transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl_dp", strategy="sequential", epochs=1, lr=0.02, augment="paper")
    m = result.metrics
    assert m["augment"] == "paper" and m["targets"] == "online"
    assert all(stage["augment"] == "paper" and stage["targets"] == "online" for stage in m["stages"])
    with pytest.raises(ConfigError, match="targets: cached"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl_dp", strategy="parallel", augment="paper", targets="cached")


# ---------------------------------------------------------------- batch-norm recalibration


def test_batch_norm_recalibration_changes_running_statistics_and_nothing_else():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.BatchNorm1d(4, momentum=0.3), nn.Linear(4, 2))
    module.train()
    norm = module[2]
    norm.running_mean.fill_(7.0)
    norm.running_var.fill_(9.0)
    norm.num_batches_tracked.fill_(11)
    with torch.no_grad():
        norm.weight.uniform_()
        norm.bias.uniform_()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    features = torch.randn(8, 4) * 3 + 1
    data = ImageData(features.view(8, 1, 1, 4), torch.zeros(8, dtype=torch.long), ["a", "b"], "features")

    assert recalibrate_batch_norm(Model(module, "m"), data, batch_size=4) == 1

    # A cumulative average over the two batches of the raw features (dropout stayed off).
    batches = features.split(4)
    expected_mean = torch.stack([b.mean(0) for b in batches]).mean(0)
    expected_var = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(norm.running_var, expected_var, atol=1e-5)
    assert int(norm.num_batches_tracked) == 2
    running = {"2.running_mean", "2.running_var", "2.num_batches_tracked"}
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]) != (key in running), key
    assert norm.momentum == 0.3 and all(m.training for m in module.modules())

    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert recalibrate_batch_norm(Model(plain, "p"), data) == 0
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())


# ---------------------------------------------------------------- command line and the Table-9 demo


def run_cli(*args):
    from click.testing import CliRunner

    from ktransfer.cli import main

    return CliRunner(env={"COLUMNS": "200"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_transfer_command_with_several_teachers(small_fashion_mnist, tiny_zoo, tmp_path):
    from ktransfer.results import REQUIRED_KEYS, read_records

    base = ["transfer", "--student", "zoo:cnn", "--teacher", "zoo:mlp", "--teacher", "zoo:mixer", "--epochs", "1", "--lr", "1e-3", "--data-dir", small_fashion_mnist]
    result = run_cli(*base, "--strategy", "soup", "--recalibrate-bn", "--method", "kl", "--out", tmp_path / "soup")
    assert result.exit_code == 0, result.output
    assert "ingredient 2 (zoo:mixer)" in result.output
    (record,) = read_records(tmp_path / "soup" / "results.jsonl")
    assert set(REQUIRED_KEYS) <= set(record)
    assert record["strategy"] == "soup" and record["teachers"] == ["zoo:mlp", "zoo:mixer"] and record["teacher"] == "zoo:mlp+zoo:mixer"
    assert [i["teacher"] for i in record["ingredients"]] == ["zoo:mlp", "zoo:mixer"] and record["recalibrate_bn"] is True
    assert list((tmp_path / "soup").glob("*soup-kl.safetensors"))

    result = run_cli(*base, "--strategy", "sequential", "--order", "given", "--out", tmp_path / "seq")
    assert result.exit_code == 0, result.output
    (record,) = read_records(tmp_path / "seq" / "results.jsonl")
    assert record["stage_teachers"] == ["zoo:mlp", "zoo:mixer"] and [h["epoch"] for h in record["history"]] == [1, 2]

    def error(result, fragment):
        assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith("Error: ") and fragment in result.output

    error(run_cli(*base, "--out", tmp_path / "x"), "--strategy parallel, sequential or soup")
    error(run_cli(*base, "--strategy", "parallel", "--method", "kl", "--out", tmp_path / "x"), "needs a data-partitioning method")
    error(run_cli(*base, "--strategy", "soup", "--order", "descending", "--out", tmp_path / "x"), "--order applies to --strategy sequential only")


def test_multi_teacher_demo(small_fashion_mnist, tiny_zoo, tmp_path):
    import json

    from ktransfer.results import read_records

    result = run_cli("demo", "--multi-teacher", "--students", "mlp", "--teachers", "cnn,mixer", "--epochs", "1", "--out", tmp_path, "--data-dir", small_fashion_mnist)
    assert result.exit_code == 0, result.output
    assert "Transfer from several teachers" in result.output
    table = json.loads((tmp_path / "multi_teacher.json").read_text())
    rows = {row["method"]: row for row in table["rows"]}
    assert set(rows) == {"kl", "kl_dp"} and rows["kl"]["parallel"] is None and rows["kl_dp"]["parallel"] is not None
    for row in rows.values():
        deltas = list(row["single_deltas"].values())
        assert row["single_min"] <= row["single_mean"] <= row["single_max"] and len(deltas) == 2
        assert row["soup_bn"] is None  # the mlp student has no batch norm: no second soup
    records = read_records(tmp_path / "results.jsonl")
    strategies = [r.get("strategy") for r in records]
    assert strategies.count(None) == 4 and strategies.count("sequential") == 2 and strategies.count("parallel") == 1 and strategies.count("soup") == 2
    soups = [r for r in records if r.get("strategy") == "soup"]
    assert all(i["reused"] for r in soups for i in r["ingredients"])  # the single-teacher runs are the ingredients
    # A rerun into the same folder reuses every finished run (the soups take the saved single-teacher students).
    again = run_cli("demo", "--multi-teacher", "--students", "mlp", "--teachers", "cnn,mixer", "--epochs", "1", "--out", tmp_path, "--data-dir", small_fashion_mnist)
    assert again.exit_code == 0, again.output
    assert f"reused {len(records)} finished runs" in again.output
    assert len(read_records(tmp_path / "results.jsonl")) == len(records)
    assert json.loads((tmp_path / "multi_teacher.json").read_text())["rows"] == table["rows"]
    error = run_cli("demo", "--multi-teacher", "--students", "cnn", "--teachers", "cnn,mlp", "--out", tmp_path / "x", "--data-dir", small_fashion_mnist)
    assert error.exit_code != 0 and "cannot be both student and teacher" in error.output


def test_only_a_soup_runs_on_an_executor(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, strong, weak = models
    with pytest.raises(ConfigError, match="executor='ray' applies to the soup strategy only"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl_dp", strategy="parallel", executor="ray")
    with pytest.raises(ConfigError, match="executor must be local or ray; got 'dask'"):
        transfer_multi(student, [strong, weak], transfer_set, eval_set, "kl", strategy="soup", executor="dask")
