import copy

import pytest
import torch

import ktransfer
from ktransfer.engine import Engine, TrainConfig
from ktransfer.errors import ConfigError, ModelError, TrainingError
from ktransfer.methods import create_method
from ktransfer.metrics import mcnemar_p_value
from ktransfer.models.base import Model
from ktransfer.models.zoo import MLP, SmallCNN
from ktransfer.predictions import PredictionCache


def trained(module, data, epochs=1, lr=0.05, seed=0):
    model = Model(module, type(module).__name__)
    Engine(model, create_method("ce"), data, TrainConfig(epochs=epochs, lr=lr, batch_size=64, seed=seed)).run()
    return module.eval()


@pytest.fixture
def pair(tiny_data):
    transfer_set, _ = tiny_data
    torch.manual_seed(0)
    return trained(MLP(), transfer_set), trained(SmallCNN(), transfer_set, epochs=2)


@pytest.mark.parametrize("method", ["kl", "kl_dp"])
def test_online_and_cached_targets_give_identical_students(tiny_data, pair, method):
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    runs = {
        mode: ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=2, lr=0.01, targets=mode, cache=PredictionCache(enabled=False))
        for mode in ("online", "cached")
    }
    online, cached = runs["online"].student.state_dict(), runs["cached"].student.state_dict()
    for key in online:
        assert torch.equal(online[key], cached[key]), key
    assert runs["online"].metrics["acc_after"] == runs["cached"].metrics["acc_after"]


def test_transfer_result_and_untouched_inputs(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    before_student = copy.deepcopy(student.state_dict())
    before_teacher = copy.deepcopy(teacher.state_dict())
    result = ktransfer.transfer(student, teacher, (transfer_set.images, transfer_set.labels), (eval_set.images, eval_set.labels), method="kl_dp", epochs=3, lr=0.01)
    assert len(result.history) == 3 and [h["epoch"] for h in result.history] == [1, 2, 3]
    for key, value in student.state_dict().items():
        assert torch.equal(value, before_student[key])
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[key])
    assert any(not torch.equal(a, b) for a, b in zip(result.student.state_dict().values(), before_student.values()))
    m = result.metrics
    assert m["method"] == "kl_dp" and m["epochs"] == 3 and m["lr"] == 0.01 and m["n_eval"] == len(eval_set)
    assert m["delta"] == pytest.approx(m["knowledge_gain"] - m["knowledge_loss"], abs=1e-9)
    assert m["delta"] == pytest.approx(m["acc_after"] - m["acc_before"], abs=1e-9)
    assert m["gain_count"] - m["loss_count"] == round((m["acc_after"] - m["acc_before"]) * m["n_eval"] / 100)
    assert m["p_value"] == mcnemar_p_value(m["gain_count"], m["loss_count"])
    assert 0.0 <= m["teacher_share"] <= 1.0
    assert m["hparams"] == {"temperature": 1.0, "supervised": True, "routing": "confidence", "flips_from": "current"}
    # the returned student really is the one evaluated last
    preds = result.model.logits(eval_set.images).argmax(1)
    assert ktransfer.metrics.accuracy(eval_set.labels, preds) == pytest.approx(m["acc_after"])


def test_dataset_input(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    dataset = torch.utils.data.TensorDataset(transfer_set.images, transfer_set.labels)
    result = ktransfer.transfer(student, teacher, dataset, eval_set, method="kl", epochs=1, lr=0.01)
    assert result.metrics["n_transfer"] == len(transfer_set)


def test_self_routing_keeps_the_student(tiny_data, pair):
    """DP's 'self' control distils the student into itself: with a tiny lr it barely moves."""
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", routing="self", epochs=1, lr=1e-4)
    assert result.metrics["teacher_share"] == 0.0
    assert result.metrics["knowledge_loss"] <= 1.0


def test_nan_loss_is_a_clear_error(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    broken = transfer_set.subset(range(len(transfer_set)), "broken")
    broken.images = broken.images.float()
    broken.images[1, 0, 0, 0] = float("nan")  # not the first sample, which is checked before training
    with pytest.raises(TrainingError, match="loss became nan"):
        ktransfer.transfer(student, teacher, broken, eval_set, method="kl", epochs=1, lr=0.01, targets="online")


def test_mismatched_label_spaces(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    student, _ = pair
    with pytest.raises(ModelError, match="ktransfer adapt"):
        ktransfer.transfer(student, MLP(num_classes=7), transfer_set, eval_set)


def test_train_state_round_trip(tiny_data):
    transfer_set, _ = tiny_data
    model = Model(MLP(), "mlp")
    engine = Engine(model, create_method("ce"), transfer_set, TrainConfig(epochs=2, lr=0.01, batch_size=64))
    engine.run()
    state = engine.state.state_dict()
    other = Engine(Model(MLP(), "mlp"), create_method("ce"), transfer_set, TrainConfig(epochs=2, lr=0.01, batch_size=64))
    other.state.load_state_dict(state)
    assert other.state.epoch == 2 and other.state.step == engine.state.step and other.state.history == engine.state.history
    assert torch.equal(other.state.generator.get_state(), engine.state.generator.get_state())


def test_zoo_models_are_reproducible(small_fashion_mnist, tiny_zoo, isolated_cache):
    """The same recipe gives the same weights, whatever the global RNG did before."""
    import shutil

    from ktransfer.pretrain import load_zoo_model

    first = load_zoo_model("cnn", small_fashion_mnist).module.state_dict()
    shutil.rmtree(isolated_cache / "zoo")
    torch.rand(1000)  # move the global RNG on
    second = load_zoo_model("cnn", small_fashion_mnist).module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_zoo_recipe_with_augmentation_is_its_own_cache_entry(small_fashion_mnist, tiny_zoo, isolated_cache):
    """augment="paper" trains other weights under another key; the default recipe's key is the one it always had."""
    import hashlib
    import json
    from dataclasses import asdict, replace

    from ktransfer.data import fashion_mnist
    from ktransfer.models import store
    from ktransfer.pretrain import load_zoo_model

    splits = fashion_mnist.load(small_fashion_mnist)
    plain = store.DEFAULT_ZOO["cnn"]
    recipe = {k: v for k, v in asdict(plain).items() if k != "augment"}
    payload = {"recipe": recipe, "pool": splits.pool.fingerprint(), "transfer": store._index_fingerprint(splits.transfer_index), "format": store.ZOO_FORMAT}
    expected = hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()
    assert plain.key(splits.pool, splits.transfer_index) == expected
    augmented = replace(plain, augment="paper")
    assert augmented.key(splits.pool, splits.transfer_index) != expected

    first = load_zoo_model("cnn", small_fashion_mnist).module.state_dict()
    second = load_zoo_model("cnn", small_fashion_mnist, recipe=augmented).module.state_dict()
    assert not all(torch.equal(first[k], second[k]) for k in first)
    assert len(list((isolated_cache / "zoo").glob("cnn-*.safetensors"))) == 2


@pytest.mark.parametrize("amp_frozen", [False, True])
def test_amp_keeps_the_frozen_models_targets_in_float32_unless_asked(tiny_data, amp_frozen):
    """bf16 autocast (it runs on the CPU too) is for the student; DP routes on the frozen models' float32 logits."""
    from ktransfer.targets import OnlineTargets

    transfer_set, _ = tiny_data
    torch.manual_seed(0)
    teacher, original = Model(MLP(hidden=64).eval(), "teacher"), Model(MLP(hidden=64).eval(), "original")
    student = Model(copy.deepcopy(original.module), "student")
    method = create_method("kl_dp")
    seen = []
    loss = method.loss
    method.loss = lambda inputs: seen.append(inputs) or loss(inputs)
    config = TrainConfig(epochs=1, lr=0.01, batch_size=128, amp=True, amp_frozen=amp_frozen)
    Engine(student, method, transfer_set, config, OnlineTargets([teacher], original)).run()
    assert len(seen) == 3
    with torch.no_grad():
        for inputs in seen:
            images = transfer_set.images[inputs.indices]
            exact = {"teacher": teacher.logits(images)[None], "original": original.logits(images)}
            got = {"teacher": inputs.teacher_logits, "original": inputs.original_logits}
            assert all(value.dtype == torch.float32 for value in got.values())
            if amp_frozen:  # asked for: the frozen models ran in bfloat16 as well
                assert not torch.equal(got["teacher"], exact["teacher"]) and not torch.equal(got["original"], exact["original"])
            else:
                assert torch.equal(got["teacher"], exact["teacher"]) and torch.equal(got["original"], exact["original"])
                assert torch.equal(method.targets(got["original"], got["teacher"], inputs.labels)["choice"], ktransfer.methods.kl.route(exact["original"], exact["teacher"], inputs.labels))
    # The student's forward pass still ran under autocast: its logits are bf16 values (8 mantissa bits), stored as float32.
    assert torch.equal(seen[-1].student_logits, seen[-1].student_logits.bfloat16().float())


def test_eval_every_scores_only_the_chosen_epochs_and_changes_no_result(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    student, teacher = pair
    runs = {
        every: ktransfer.transfer(student, teacher, transfer_set, eval_set, method="kl_dp", epochs=3, lr=0.01, eval_every=every, cache=PredictionCache(enabled=False))
        for every in (1, 2, 0)
    }
    scored = {every: [entry["epoch"] for entry in run.history if "acc" in entry] for every, run in runs.items()}
    assert scored == {1: [1, 2, 3], 2: [2, 3], 0: [3]}
    assert [len(run.history) for run in runs.values()] == [3, 3, 3]  # every epoch keeps its training loss
    assert all("train_loss" in entry for run in runs.values() for entry in run.history)
    reference = runs[1]
    for every in (2, 0):
        weights = runs[every].student.state_dict()
        assert all(torch.equal(weights[key], value) for key, value in reference.student.state_dict().items())
        for key in ("acc_after", "delta", "knowledge_gain", "knowledge_loss", "p_value", "capture"):
            assert runs[every].metrics[key] == reference.metrics[key], key
    assert runs[2].history[1]["acc"] == reference.history[1]["acc"]


def test_eval_every_must_not_be_negative(tiny_data, pair):
    transfer_set, eval_set = tiny_data
    with pytest.raises(ConfigError, match="eval_every"):
        ktransfer.transfer(*pair, transfer_set, eval_set, method="kl", epochs=1, lr=0.01, eval_every=-1)
