"""XE-KL-Dist + MCL: the KL mask, slow weights in their own tensors, evaluation that leaves training alone."""

import copy
import threading

import pytest
import torch
from torch import nn

import ktransfer
from ktransfer.distributed import Ranks
from ktransfer.engine import Engine, Evaluator, TrainConfig
from ktransfer.methods import create_method
from ktransfer.methods.base import StepInputs
from ktransfer.methods.kl import kl_per_sample
from ktransfer.methods.mcl import mcl_distillation_mask
from ktransfer.models.base import Model
from ktransfer.models.zoo import MLP
from ktransfer.targets import OnlineTargets


def test_mask_drops_kl_only_where_teacher_wrong_and_student_right():
    labels = torch.tensor([0, 0, 0, 0])
    # student right/wrong × teacher right/wrong
    student = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    assert mcl_distillation_mask(teacher, student, labels).tolist() == [True, False, True, True]
    method = create_method("xe_kl_mcl", weight=0.7)
    out = method.loss(StepInputs(student, labels, teacher[None]))
    kl = kl_per_sample(teacher, student, 1.0)
    expected = 0.7 * (kl[0] + kl[2] + kl[3]) / 3 + 0.3 * nn.functional.cross_entropy(student, labels)  # mean over the 3 kept samples
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.stats["teacher_share"] == 0.75


def test_masked_kl_is_the_mean_over_kept_samples_and_zero_when_none_is_kept():
    labels = torch.tensor([0, 0])
    student = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # right on both samples
    method = create_method("xe_kl_mcl", weight=1.0)  # λ = 1: the loss is the masked KL alone
    # Teacher wrong on sample 1 only: the KL of sample 0 alone, not half of it.
    teacher = torch.tensor([[0.5, 0.0], [0.0, 3.0]])
    p_t, p_s = torch.softmax(teacher[0], -1), torch.softmax(student[0], -1)
    by_hand = float((p_t * (p_t / p_s).log()).sum())
    assert method.loss(StepInputs(student, labels, teacher[None])).loss.item() == pytest.approx(by_hand, rel=1e-5)
    # Teacher wrong everywhere: nothing kept, the KL term is 0 (no NaN) and still differentiable.
    student = student.clone().requires_grad_(True)
    out = method.loss(StepInputs(student, labels, torch.tensor([[0.0, 3.0], [0.0, 1.0]])[None]))
    assert out.loss.item() == 0.0 and out.stats["teacher_share"] == 0.0
    out.loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def small_net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def test_slow_weights_move_every_nth_step_by_momentum():
    torch.manual_seed(0)
    student = small_net()
    method = create_method("xe_kl_mcl", slow_momentum=0.9, update_every=2)
    method.setup(student)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(method.slow.parameters(), student.parameters()))
    start = copy.deepcopy(method.slow.state_dict())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student.train()(torch.randn(8, 3))  # changes the batch-norm statistics and its counter
    method.after_step(student, 1)  # not an N-th step: nothing moves
    assert all(torch.equal(v, start[k]) for k, v in method.slow.state_dict().items())
    method.after_step(student, 2)
    live = student.state_dict()
    for key, value in method.slow.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.9 * start[key] + 0.1 * live[key], atol=1e-6), key
        else:
            assert torch.equal(value, live[key]), key  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in method.slow.parameters())


def test_training_and_slow_weights_separate_and_evaluation_leaves_training_untouched(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = Model(MLP(hidden=32), "student"), Model(MLP(hidden=32), "teacher")
    method = create_method("xe_kl_mcl", slow_momentum=0.5, update_every=2)
    engine = Engine(student, method, transfer_set, TrainConfig(epochs=1, lr=0.05, batch_size=64), OnlineTargets([teacher], None), Evaluator(eval_set))
    engine.train_epoch()
    assert engine.method.eval_module(student.module) is method.slow
    differing = [k for k, v in method.slow.state_dict().items() if not torch.equal(v, student.module.state_dict()[k])]
    assert differing, "after six steps the slow weights must differ from the training weights"
    training_before = copy.deepcopy(student.module.state_dict())
    slow_before = copy.deepcopy(method.slow.state_dict())
    assert student.module.training
    engine.evaluate()
    assert student.module.training  # evaluation did not switch the training module to eval mode
    for key, value in student.module.state_dict().items():
        assert torch.equal(value, training_before[key]), key
    for key, value in method.slow.state_dict().items():
        assert torch.equal(value, slow_before[key]), key
    method.on_epoch_end(student.module)  # the method as described: training weights stay where they are
    assert any(not torch.equal(v, method.slow.state_dict()[k]) for k, v in student.module.state_dict().items())


def test_reset_to_slow_each_epoch_reproduces_the_authors_behaviour(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    method = create_method("xe_kl_mcl", reset_to_slow_each_epoch=True)
    student, teacher = Model(MLP(hidden=32), "student"), Model(MLP(hidden=32), "teacher")
    engine = Engine(student, method, transfer_set, TrainConfig(epochs=1, lr=0.05, batch_size=64), OnlineTargets([teacher], None), Evaluator(eval_set))
    engine.run()
    for key, value in student.module.state_dict().items():
        assert torch.equal(value, method.slow.state_dict()[key]), key


def test_transfer_returns_and_scores_the_slow_weights(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = MLP(hidden=32).eval(), MLP(hidden=32).eval()
    method = create_method("xe_kl_mcl")  # τ = 0.9999: after 6 steps the slow weights have barely moved
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method=method, epochs=1, batch_size=64)
    assert result.student is method.slow
    assert result.metrics["lr"] == 1e-2  # the paper's learning rate for MCL
    predictions = result.model.module.eval()(result.model.preprocess(eval_set.images)).argmax(1)
    assert result.metrics["acc_after"] == pytest.approx(100.0 * float((predictions == eval_set.labels).float().mean()))
    moved = max(float((a - b).detach().abs().max()) for a, b in zip(result.student.parameters(), student.parameters()))
    assert 0 < moved < 1e-2


def test_returned_slow_student_trains_again_with_the_students_own_trainable_parameters(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teacher = MLP(hidden=32).eval(), MLP(hidden=32).eval()
    student.body[1].requires_grad_(False)  # a user's frozen first layer stays frozen
    result = ktransfer.transfer(student, teacher, transfer_set, eval_set, method="xe_kl_mcl", epochs=1, batch_size=128)
    flags = [p.requires_grad for p in result.student.parameters()]
    assert flags == [p.requires_grad for p in student.parameters()] and any(flags) and not all(flags)
    again = ktransfer.transfer(result.student, teacher, transfer_set, eval_set, method="xe_kl_mcl", epochs=1, batch_size=128)
    assert len(again.history) == 1


def test_sequential_multi_teacher_with_mcl_runs_every_stage(tiny_data):
    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    student, teachers = MLP(hidden=32).eval(), [MLP(hidden=24).eval(), MLP(hidden=48).eval()]
    result = ktransfer.transfer_multi(student, teachers, transfer_set, eval_set, "xe_kl_mcl", strategy="sequential", epochs=1, batch_size=128)
    assert [stage["stage"] for stage in result.metrics["stages"]] == [1, 2]
    assert all(p.requires_grad for p in result.student.parameters())


def test_a_student_without_trainable_parameters_is_refused_before_any_work(tiny_data):
    transfer_set, eval_set = tiny_data
    frozen = MLP(hidden=32).requires_grad_(False)
    with pytest.raises(ktransfer.errors.ConfigError, match="requires_grad_"):
        ktransfer.transfer(frozen, MLP(hidden=32), transfer_set, eval_set, method="kl", epochs=1)


class _ThreadRanks(Ranks):
    """A rank of a group simulated by threads of one process: ``sum`` is an all-reduce over them."""

    def __init__(self, rank: int, world_size: int, slots: list, barrier: threading.Barrier):
        super().__init__(rank, world_size, rank)
        self.slots, self.barrier = slots, barrier

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        self.slots[self.rank] = value.detach().clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)
        self.barrier.wait()  # every rank has read the slots before the next sum writes them
        return total


def _simulated_ddp_gradient(net, method, images, teacher, labels, world_size, batch_size):
    """The gradient DDP averages over ``world_size`` ranks, each weighting its share's loss as the engine does."""
    slots, barrier, grads, errors = [None] * world_size, threading.Barrier(world_size), [None] * world_size, []

    def rank_step(rank):
        try:
            ranks = _ThreadRanks(rank, world_size, slots, barrier)
            shard = ranks.shard(torch.arange(len(labels)), batch_size)
            mine, (weight,) = shard.last if shard.last is not None else shard.full, shard.weights
            replica = copy.deepcopy(net)
            inputs = StepInputs(replica(images[mine]), labels[mine], teacher[mine][None], subset_divisor=ranks.subset_divisor(weight))
            (method.loss(inputs).loss * weight).backward()
            grads[rank] = [p.grad for p in replica.parameters()]
        except Exception as error:  # noqa: BLE001 - raised again in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=rank_step, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [sum(per_rank) / world_size for per_rank in zip(*grads)]


@pytest.mark.parametrize("size, world_size, batch_size", [(8, 2, 8), (7, 2, 8), (6, 4, 8)])
def test_under_torchrun_the_masked_kl_gradient_is_the_global_batchs(size, world_size, batch_size):
    """Ranks that keep different numbers of samples (2 of 4 against 4 of 4, say) still average to the
    one-process gradient: the KL is divided by the kept count of the whole global batch, not the rank's own.
    (7 of a global batch of 8: shares of 4 and 3. 6 on 4 ranks: shares of 2, and the fourth rank steps on a
    stand-in with weight 0, which must count nothing.)"""
    # One-hot images and a linear student: sample i's logits are the student's column i. It is right on the
    # even samples; the teacher is wrong on the first half. So the mask drops the even samples of the first half.
    torch.manual_seed(0)
    images, labels = torch.eye(size), torch.arange(size) % 4
    net = nn.Linear(size, 4)
    right = torch.arange(size) % 2 == 0
    with torch.no_grad():
        net.weight.copy_(torch.randn(4, size) * 0.3 + 2 * nn.functional.one_hot(torch.where(right, labels, (labels + 1) % 4), 4).T)
    teacher_wrong = torch.arange(size) < size // 2
    teacher = torch.randn(size, 4) + 3 * nn.functional.one_hot(torch.where(teacher_wrong, (labels + 2) % 4, labels), 4)
    method = create_method("xe_kl_mcl", weight=0.8, temperature=2.0)
    logits = net(images)
    keep = mcl_distillation_mask(teacher, logits, labels)
    # The check is worth something only if the ranks keep different shares.
    shards = [Ranks(rank, world_size, rank).shard(torch.arange(size), batch_size) for rank in range(world_size)]
    shares = [keep[shard.last if shard.last is not None else shard.full].float().mean() for shard in shards if shard.weights[0] > 0]
    assert 0 < keep.sum() < size and max(shares) != min(shares)
    global_grad = torch.autograd.grad(method.loss(StepInputs(logits, labels, teacher[None])).loss, list(net.parameters()))
    ddp_grad = _simulated_ddp_gradient(net, method, images, teacher, labels, world_size, batch_size)
    largest = max(g.abs().max() for g in global_grad)
    assert largest > 1e-2
    for ours, expected in zip(ddp_grad, global_grad):
        assert torch.allclose(ours, expected, atol=1e-6, rtol=1e-5)
