"""CD and CRD: similarity-matching KL, Tian et al.'s NCE loss, and the bounded embedding memory."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktransfer.methods import create_method
from ktransfer.methods.base import StepInputs
from ktransfer.methods.contrastive import EmbeddingQueue, nce_loss, similarity_distillation, similarity_logits


def test_cd_zero_for_equal_or_rescaled_features():
    torch.manual_seed(0)
    features = torch.randn(16, 8)
    assert similarity_distillation(features, features.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_distillation(3.0 * features, features).item() == pytest.approx(0.0, abs=1e-6)  # cosine: scale-free


def test_cd_hand_computed_with_other_widths_a_temperature_and_both_reductions():
    # Widths may differ (2 and 3): only the B×B similarity matrices meet.
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cosine 1/√2
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # cosine 0
    tau, c = 0.5, 1 / math.sqrt(2)
    p = math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(c / tau))  # σ(S_s / τ) on the diagonal, each row
    q = math.exp(1 / tau) / (math.exp(1 / tau) + 1.0)  # σ(S_t / τ) on the diagonal, each row
    forward = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))  # KL(σ(S_t) ‖ σ(S_s)), equal in both rows
    reverse = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert forward > 0 and reverse > 0 and forward != pytest.approx(reverse)  # KL is not symmetric here
    assert similarity_distillation(student, teacher, temperature=tau).item() == pytest.approx(forward, rel=1e-5)
    assert similarity_distillation(student, teacher, temperature=tau, reverse=True).item() == pytest.approx(reverse, rel=1e-5)
    assert similarity_distillation(student, teacher, temperature=tau, reduction="sum").item() == pytest.approx(2 * forward, rel=1e-5)
    # cosine similarities: rescaling one sample's features changes nothing
    rescaled = student * torch.tensor([[1.0], [3.0]])
    assert similarity_distillation(rescaled, teacher, temperature=tau).item() == pytest.approx(forward, rel=1e-5)


def test_cd_hand_computed():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # orthogonal: S_s = identity
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # parallel: S_t = all ones, a uniform softmax
    assert torch.allclose(similarity_logits(student), torch.eye(2))
    e = math.e
    p_s = (e / (e + 1), 1 / (e + 1))  # each row of σ(S_s)
    forward = 0.5 * math.log(0.5 / p_s[0]) + 0.5 * math.log(0.5 / p_s[1])  # KL(σ(S_t) ‖ σ(S_s))
    reverse = p_s[0] * math.log(p_s[0] / 0.5) + p_s[1] * math.log(p_s[1] / 0.5)  # KL(σ(S_s) ‖ σ(S_t))
    assert similarity_distillation(student, teacher).item() == pytest.approx(forward, rel=1e-5)
    assert similarity_distillation(student, teacher, reverse=True).item() == pytest.approx(reverse, rel=1e-5)
    labels = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    method = create_method("cd", cd_weight=2.0, ce_weight=0.5)
    out = method.loss(StepInputs(logits, labels, torch.zeros(1, 2, 2), student_features=student, teacher_features=teacher))
    assert out.loss.item() == pytest.approx(2.0 * forward + 0.5 * F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_cd_authors_sums_the_rows_and_weighs_cd_100_b_times_more_than_cd_against_ce():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # S_s = identity
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0]])  # S_t = all ones
    e = math.e
    row_kl = 0.5 * math.log(0.5 * (e + 1) / e) + 0.5 * math.log(0.5 * (e + 1))  # KL(uniform ‖ (e, 1)/(e + 1)), equal in both rows
    labels, logits = torch.tensor([0, 1]), torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = F.cross_entropy(logits, labels).item()
    inputs = StepInputs(logits, labels, torch.zeros(1, 2, 2), student_features=student, teacher_features=teacher)
    plain, authors = create_method("cd").loss(inputs), create_method("cd_authors").loss(inputs)
    assert plain.loss.item() == pytest.approx(1.0 * row_kl + 1.0 * ce, rel=1e-5)  # mean over 2 rows, equal weights
    assert authors.loss.item() == pytest.approx(10.0 * (2 * row_kl) + 0.1 * ce, rel=1e-5)  # summed over 2 rows, β = 10, γ = 0.1
    # Per unit of CE, the similarity term (as cd reports it, a mean over rows) weighs 1 in cd and 10·B/0.1 = 100·B in cd_authors.
    torch.manual_seed(0)
    batch = 6
    wide = StepInputs(torch.randn(batch, 3), torch.arange(batch) % 3, torch.zeros(1, batch, 3), student_features=torch.randn(batch, 5), teacher_features=torch.randn(batch, 7))
    wide_plain, wide_authors = create_method("cd").loss(wide), create_method("cd_authors").loss(wide)
    assert wide_authors.stats["cd"].item() == pytest.approx(batch * wide_plain.stats["cd"].item(), rel=1e-5)
    assert wide_authors.loss.item() == pytest.approx(100 * batch * 0.1 * wide_plain.stats["cd"].item() + 0.1 * wide_plain.stats["ce"].item(), rel=1e-5)
    # The preset is cd with other defaults: the same loss from cd with those settings.
    same = create_method("cd", cd_weight=10, ce_weight=0.1, reduction="sum").loss(inputs)
    assert same.loss.item() == pytest.approx(authors.loss.item(), rel=1e-6)


def test_nce_loss_hand_computed_and_own_slot_excluded():
    anchor = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([[0.6, 0.8]])
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    tau, log_z = 0.5, 0.3
    ratio = lambda score: math.exp(score / tau - log_z)
    # slot 2 is the anchor's own sample: K = 2 negatives, slots 0 and 1
    k = 2
    expected = -math.log(ratio(0.6) / (ratio(0.6) + k)) - math.log(k / (ratio(0.0) + k)) - math.log(k / (ratio(-1.0) + k))
    got = nce_loss(anchor, positive, bank, torch.tensor([2]), tau, log_z)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    k = 3  # nothing excluded: the third slot is a negative too
    expected_all = -math.log(ratio(0.6) / (ratio(0.6) + k)) - sum(math.log(k / (ratio(s) + k)) for s in (0.0, -1.0, 1.0))
    assert nce_loss(anchor, positive, bank, torch.tensor([-1]), tau, log_z).item() == pytest.approx(expected_all, rel=1e-5)


def test_nce_loss_where_every_score_is_zero_by_hand_and_lower_for_aligned_pairs():
    # Anchors orthogonal to their positives and to all K = 5 negatives, Z = 1: every ratio r is 1, so the loss of
    # each anchor is −log(1/(1+K)) − K·log(K/(1+K)) = log 6 + 5·log(6/5) = 2.70...
    eye = torch.eye(8)
    anchors, positives, bank = eye[[0, 1]], eye[[2, 3]], eye[3:8]
    k = 5
    expected = math.log(1 + k) + k * math.log((1 + k) / k)
    assert nce_loss(anchors, positives, bank, torch.full((2,), -1), 0.07, 0.0).item() == pytest.approx(expected, rel=1e-6)
    # An aligned positive (score 1/τ) and an orthogonal one against random negatives: aligned is lower.
    torch.manual_seed(1)
    anchors = F.normalize(torch.randn(32, 16), dim=1)
    bank = F.normalize(torch.randn(64, 16), dim=1)
    none = torch.full((32,), -1)
    aligned = nce_loss(anchors, anchors, bank, none, 0.07, 0.0)
    random = nce_loss(anchors, F.normalize(torch.randn(32, 16), dim=1), bank, none, 0.07, 0.0)
    assert aligned.item() < random.item()


def test_memory_queue_is_bounded_fifo_with_momentum_for_remembered_samples():
    torch.manual_seed(2)
    queue = EmbeddingQueue(capacity=16, dim=4)
    nbytes = queue.nbytes
    assert nbytes == 2 * 16 * 4 * 4 + 16 * 8
    for start in range(0, 500, 10):  # 500 distinct samples stream through 16 slots
        indices = torch.arange(start, start + 10)
        queue.update(indices, F.normalize(torch.randn(10, 4), dim=1), F.normalize(torch.randn(10, 4), dim=1), 0.5)
        assert queue.nbytes == nbytes and queue.student.shape == (16, 4) and queue.teacher.shape == (16, 4)
    assert sorted(queue.index.tolist()) == list(range(484, 500))  # the newest 16, oldest overwritten first
    # a remembered sample is blended into its slot, not enqueued again
    slot = int(queue.slots_of(torch.tensor([490]))[0])
    old_student, old_teacher = queue.student[slot].clone(), queue.teacher[slot].clone()
    new_student, new_teacher = F.normalize(torch.randn(1, 4), dim=1), F.normalize(torch.randn(1, 4), dim=1)
    queue.update(torch.tensor([490]), new_student, new_teacher, 0.5)
    assert torch.allclose(queue.student[slot], F.normalize(0.5 * old_student + 0.5 * new_student[0], dim=0), atol=1e-6)
    assert torch.allclose(queue.teacher[slot], F.normalize(0.5 * old_teacher + 0.5 * new_teacher[0], dim=0), atol=1e-6)
    assert sorted(queue.index.tolist()) == list(range(484, 500))
    assert queue.slots_of(torch.tensor([3, 499, -1])).tolist()[0::2] == [-1, -1]


def test_crd_trains_its_heads_and_keeps_its_memory_bounded(tiny_data):
    import ktransfer
    from ktransfer.models.zoo import MLP

    transfer_set, eval_set = tiny_data
    torch.manual_seed(0)
    method = create_method("crd", negatives="48", feat_dim=8)
    teacher = MLP(hidden=48)
    teacher.body[3] = nn.Linear(48, 20)  # a teacher with 20-wide features
    teacher.head = nn.Linear(20, 10)
    result = ktransfer.transfer(MLP(hidden=32), teacher, transfer_set, eval_set, method=method, epochs=2, lr=0.01, batch_size=64)
    assert method.memory.nbytes == 2 * 48 * 8 * 4 + 48 * 8  # 384 samples seen twice, 48 remembered
    assert method.memory.index.ge(0).all() and len(set(method.memory.index.tolist())) == 48
    assert method.embed_student.weight.shape == (8, MLP().num_features) and method.embed_teacher.weight.shape == (8, 20)
    for head in (method.embed_student, method.embed_teacher):  # in the optimiser, trained by the loss
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    history = result.history
    assert all(math.isfinite(h["crd"]) and h["crd"] > 0 for h in history)
    assert result.metrics["hparams"]["negatives"] == 48


def test_memory_enqueue_beats_a_blend_on_the_same_slot_and_keeps_the_rest():
    queue = EmbeddingQueue(capacity=4, dim=2)
    rows = F.normalize(torch.randn(4, 2), dim=1)
    queue.update(torch.arange(4), rows, rows, 0.5)  # full; the oldest slot (0) holds sample 0
    before_student = queue.student.clone()
    new = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    queue.update(torch.tensor([0, 10]), new, new, 0.5)  # sample 0 is remembered in slot 0, which sample 10 now takes
    assert queue.index.tolist() == [10, 1, 2, 3]
    assert torch.allclose(queue.student[0], new[1]) and torch.equal(queue.student[1:], before_student[1:])
    assert int(queue.pointer) == 1
