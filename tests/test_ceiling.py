"""The ceiling of every transfer record: ensemble and oracle of student and teacher(s) on the evaluation set, and capture."""

import math

import pytest
import torch

import ktransfer
from ktransfer.controls import run_control
from ktransfer.data.base import ImageData
from ktransfer.engine import Engine, TrainConfig
from ktransfer.methods import create_method
from ktransfer.models.base import Model
from ktransfer.models.zoo import MLP
from ktransfer.multi import transfer_multi
from ktransfer.predictions import PredictionCache, compute_logits

from conftest import make_images

KEYS = ("ensemble_acc", "ensemble_delta", "oracle_acc", "capture")


def pretrained(data, epochs, seed):
    torch.manual_seed(seed)
    module = MLP(hidden=32)
    Engine(Model(module, "m"), create_method("ce"), data, TrainConfig(epochs=epochs, lr=0.1, batch_size=64, seed=seed)).run()
    return module.eval()


@pytest.fixture(scope="module")
def models():
    transfer_set = ImageData(*make_images(384, seed=1), [f"class{i}" for i in range(10)], "tiny/transfer")
    # Partly trained, on different images: models with different mistakes, so the ensemble moves.
    student = pretrained(transfer_set.subset(range(192), "tiny/a"), 4, seed=1)
    teacher = pretrained(transfer_set.subset(range(192, 384), "tiny/b"), 4, seed=2)
    other = pretrained(transfer_set, 2, seed=3)
    return student, teacher, other


def independent_ceiling(eval_set, models):
    """Ensemble (mean of softmax, argmax) and oracle computed here, in torch, from each model's own logits."""
    probs = [compute_logits(Model(m, f"m{i}"), eval_set).softmax(1) for i, m in enumerate(models)]
    labels = eval_set.labels
    ensemble = 100.0 * float((torch.stack(probs).mean(0).argmax(1) == labels).float().mean())
    oracle = 100.0 * float(torch.stack([p.argmax(1) == labels for p in probs]).any(0).float().mean())
    student = 100.0 * float((probs[0].argmax(1) == labels).float().mean())
    return ensemble, oracle, student


def check_record(record, expected):
    ensemble, oracle, student = expected
    assert all(key in record for key in KEYS)
    assert math.isclose(record["ensemble_acc"], ensemble, abs_tol=1e-9)
    assert math.isclose(record["oracle_acc"], oracle, abs_tol=1e-9)
    assert math.isclose(record["acc_before"], student, abs_tol=1e-9)
    assert math.isclose(record["ensemble_delta"], ensemble - student, abs_tol=1e-9)
    if record["ensemble_delta"] > 0:
        assert math.isclose(record["capture"], record["delta"] / record["ensemble_delta"])
    else:
        assert record["capture"] is None


def test_a_transfer_record_holds_the_ceiling_of_its_pair(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, teacher, _ = models
    expected = independent_ceiling(eval_set, [student, teacher])
    assert expected[0] - expected[2] > 0  # the fixture's pair has a ceiling to aim at: capture is defined
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=1, lr=0.01)
    check_record(result.metrics, expected)
    assert expected[1] >= max(result.metrics["acc_before"], result.metrics["teacher_acc"])


def test_the_teachers_eval_logits_are_computed_once(tiny_data, models, monkeypatch):
    transfer_set, eval_set = tiny_data
    student, teacher, _ = models
    calls = []
    import ktransfer.predictions as predictions

    original = predictions.compute_logits
    monkeypatch.setattr(predictions, "compute_logits", lambda model, data, *a, **k: calls.append((model.name, data.name)) or original(model, data, *a, **k))
    ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl", epochs=1, cache=PredictionCache(enabled=False))
    assert calls.count(("teacher", eval_set.name)) == 1
    assert calls.count(("student (original)", eval_set.name)) == 1


def test_several_teachers_use_the_ensemble_of_all(tiny_data, models):
    transfer_set, eval_set = tiny_data
    student, teacher, other = models
    expected = independent_ceiling(eval_set, [student, teacher, other])
    result = ktransfer.transfer(student, [teacher, other], transfer_set, eval_set, method="kl_dp", epochs=1)
    check_record(result.metrics, expected)
    for strategy in ("parallel", "sequential", "soup"):
        record = transfer_multi(student, [teacher, other], transfer_set, eval_set, strategy=strategy, method="kl_dp", epochs=1).metrics
        check_record(record, expected)


def test_control_records_have_the_keys_empty(tiny_data, models):
    transfer_set, eval_set = tiny_data
    record = run_control("self", models[0], transfer_set, eval_set, epochs=1, lr=0.01).metrics
    assert {key: record[key] for key in KEYS} == dict.fromkeys(KEYS)
