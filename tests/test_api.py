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
