"""What ktransfer.transfer gives back and leaves behind: an eval-mode student, the user's models as they were."""

import pytest
import torch
from torch import nn

import ktransfer
from ktransfer.api import ModuleState, kept_as_given
from ktransfer.methods import create_method
from ktransfer.models.zoo import MLP
from ktransfer.multi import transfer_multi


def modes(module: nn.Module) -> list[bool]:
    return [sub.training for sub in module.modules()]


def user_model(train: bool, frozen_part: bool = False) -> nn.Module:
    """A zoo MLP in the given mode; with ``frozen_part`` its first layer is set to eval mode on its own."""
    module = MLP(hidden=32).train(train)
    if frozen_part:
        module.body[1].eval()
    return module


@pytest.mark.parametrize("method, targets", [("kl_dp", "online"), ("kl_dp", "cached"), ("xe_kl_mcl", "cached")])
def test_transfer_returns_an_eval_mode_student_and_leaves_the_given_models_in_their_modes(tiny_data, method, targets):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = user_model(train=True, frozen_part=True), user_model(train=True)
    student_modes, teacher_modes = modes(student), modes(teacher)
    assert False in student_modes and True in student_modes
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=1, targets=targets)
    assert not any(modes(result.student)) and not any(modes(result.model.module))
    assert modes(student) == student_modes and modes(teacher) == teacher_modes
    assert all(p.device.type == "cpu" for p in [*student.parameters(), *teacher.parameters()])


def test_the_given_models_are_put_back_when_the_transfer_fails(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = user_model(train=True), user_model(train=True)
    method = create_method("kl_dp")

    def failing_loss(inputs):
        raise RuntimeError("failed on purpose")

    method.loss = failing_loss
    with pytest.raises(RuntimeError, match="failed on purpose"):
        # online targets: the frozen models are switched to eval mode before the first step
        ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=1, targets="online")
    assert all(modes(student)) and all(modes(teacher))


@pytest.mark.parametrize("strategy", ["parallel", "sequential", "soup"])
def test_transfer_multi_returns_an_eval_mode_student_and_leaves_the_given_models_in_their_modes(tiny_data, strategy):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teachers = user_model(train=True, frozen_part=True), [user_model(train=True), user_model(train=False)]
    before = [modes(m) for m in (student, *teachers)]
    result = transfer_multi(student, teachers, transfer_set, eval_set, "kl_dp", strategy=strategy, epochs=1, targets="online")
    assert not any(modes(result.student))
    assert [modes(m) for m in (student, *teachers)] == before


def test_module_state_puts_parameters_and_buffers_back_on_their_devices():
    with torch.device("meta"):  # a second device that exists on every machine
        module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    module.train()
    with kept_as_given(module):
        module.to_empty(device="cpu").eval()
        assert all(t.device.type == "cpu" for t in [*module.parameters(), *module.buffers()])
    assert all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])
    assert all(modes(module))
    # Spread over two devices: each tensor goes back to its own.
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    module[1].to("meta")
    with kept_as_given(module):
        module.to_empty(device="cpu")
    assert [p.device.type for p in module.parameters()] == ["cpu", "cpu", "meta", "meta"]
    assert {b.device.type for b in module.buffers()} == {"meta"}


def tabular(count: int, seed: int, features: int = 20, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Float features [N, 20] whose class shifts the mean of a few of them: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    x = torch.randn(count, features, generator=generator)
    x[torch.arange(count), labels] += 2.0
    return x, labels


def mlp(hidden: int, features: int = 20, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def test_transfer_takes_tabular_features_for_models_without_image_preprocessing():
    torch.manual_seed(0)
    transfer_data, eval_data = tabular(256, seed=1), tabular(128, seed=2)
    student, teacher = mlp(16), fit(mlp(32), *transfer_data)  # a teacher that knows something
    runs = {
        targets: ktransfer.transfer(student, teacher, transfer_data, eval_data, method="kl_dp", epochs=2, lr=0.05, batch_size=64, targets=targets, cache=ktransfer.PredictionCache(enabled=False))
        for targets in ("cached", "online")
    }
    cached = runs["cached"]
    m = cached.metrics
    assert m["targets"] == "cached" and m["n_transfer"] == 256 and m["n_eval"] == 128
    with torch.no_grad():
        acc = lambda module: 100.0 * float((module(eval_data[0]).argmax(1) == eval_data[1]).float().mean())
        assert m["acc_before"] == pytest.approx(acc(student)) and m["teacher_acc"] == pytest.approx(acc(teacher))
        assert m["acc_after"] == pytest.approx(acc(cached.student))
    assert m["teacher_acc"] > m["acc_before"]  # the teacher has something to give
    assert m["delta"] == pytest.approx(m["knowledge_gain"] - m["knowledge_loss"], abs=1e-9)
    assert 0.0 < m["teacher_share"] < 1.0
    for key, value in cached.student.state_dict().items():  # cached and online targets train the same student
        assert torch.equal(value, runs["online"].student.state_dict()[key]), key


def fit(module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 100) -> nn.Module:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    return module.eval()


def test_tabular_features_with_image_preprocessing_are_refused_before_any_work():
    transfer_data, eval_data = tabular(64, seed=1), tabular(32, seed=2)
    image_model = ktransfer.Model(mlp(16), "image-student", ktransfer.Preprocess(mean=(0.5,), std=(0.25,)))
    with pytest.raises(ktransfer.errors.ModelError, match=r"not images \[N, C, H, W\].*image-student preprocesses images"):
        ktransfer.transfer(image_model, mlp(32), transfer_data, eval_data, method="kl_dp", epochs=1)
    with pytest.raises(ktransfer.errors.ModelError, match="works on images"):
        image_model.logits(transfer_data[0])


def test_image_data_still_gets_a_channel_axis_and_needs_a_sample_axis():
    from ktransfer.data.base import ImageData
    from ktransfer.errors import DataError

    greyscale = ImageData(torch.zeros(3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0]), ["a", "b"])
    assert greyscale.images.shape == (3, 1, 8, 8) and greyscale.is_images
    features = ImageData(torch.zeros(3, 20), torch.tensor([0, 1, 0]), ["a", "b"])
    assert features.images.shape == (3, 20) and not features.is_images
    with pytest.raises(DataError, match="first axis of samples"):
        ImageData(torch.tensor(1.0), torch.tensor([0]), ["a"])


def test_a_model_keeps_its_declared_fields_through_a_transfer(tiny_data):
    # architecture and class_names are fields of Model: a rebuilt model (the trained copy, the result) keeps them
    torch.manual_seed(0)
    names = [f"c{i}" for i in range(10)]
    student = ktransfer.Model(MLP(hidden=16), "s", architecture="zoo:mlp", class_names=names)
    result = ktransfer.transfer(student, MLP(hidden=16), *tiny_data, epochs=1, lr=0.01)
    assert (result.model.architecture, result.model.class_names, result.model.name) == ("zoo:mlp", names, "s")
    assert result.model.module is result.student and result.model.fingerprint() != student.fingerprint()
    renamed = student.rebuilt(name="t", _fingerprint=student.fingerprint())
    assert renamed.module is student.module and renamed.class_names == names and renamed.fingerprint() == student.fingerprint()
