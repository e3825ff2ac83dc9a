import math

import pytest
import torch
import torch.nn.functional as F

from ktransfer.errors import ConfigError
from ktransfer.methods import create_method
from ktransfer.methods.base import StepInputs
from ktransfer.methods.kl import kl_to_target, margins, route


def test_kl_zero_when_student_equals_teacher():
    z = torch.randn(8, 10)
    assert kl_to_target(z, z.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_target(z, z + 3.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant


def test_kl_hand_computed():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_to_target(teacher, student, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # T² scaling: at T = 2 the loss is 4·KL of the softened distributions
    soft_t, soft_s = F.softmax(teacher / 2, -1), F.softmax(student / 2, -1)
    expected_t2 = 4 * float((soft_t * (soft_t.log() - soft_s.log())).sum())
    assert kl_to_target(teacher, student, 2.0).item() == pytest.approx(expected_t2, rel=1e-5)


def test_route_supervised_unsupervised_and_ties():
    big = 5.0
    # sample 0: teacher sure of the true class 0; sample 1: original sure of true class 1;
    # sample 2: identical logits (a tie) -> original; sample 3: teacher more confident overall but wrong
    original = torch.tensor([[0.0, 0.0, 0.0], [0.0, big, 0.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    teacher = torch.tensor([[big, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, big]])[None]
    labels = torch.tensor([0, 1, 2, 1])
    assert route(original, teacher, labels).tolist() == [1, 0, 0, 0]
    assert route(original, teacher, None).tolist() == [1, 0, 0, 1]


def test_route_several_teachers_picks_most_confident_ties_to_earlier():
    original = torch.zeros(2, 3)
    teachers = torch.stack([torch.tensor([[2.0, 0, 0], [0, 0, 4.0]]), torch.tensor([[2.0, 0, 0], [0, 0, 5.0]])])
    assert route(original, teachers, torch.tensor([0, 2])).tolist() == [1, 2]


def test_route_ablations():
    labels = torch.tensor([0, 0, 0, 0])
    # original right/wrong x teacher right/wrong
    original = torch.tensor([[3.0, 0], [3.0, 0], [0, 3.0], [0, 3.0]])
    teacher = torch.tensor([[3.0, 0], [0, 3.0], [3.0, 0], [0, 3.0]])[None]
    assert route(original, teacher, labels, "teacher_on_positive_flips").tolist() == [0, 0, 1, 0]
    assert route(original, teacher, labels, "student_on_negative_flips").tolist() == [1, 0, 1, 1]
    assert route(original, teacher, labels, "self").tolist() == [0, 0, 0, 0]


def test_margins_hand_computed():
    # label 0; probabilities written out so the margins are exact
    probs = torch.tensor([[[0.6, 0.35, 0.05], [0.1, 0.7, 0.2]], [[0.55, 0.25, 0.20], [0.3, 0.3, 0.4]]])
    labels = torch.tensor([0, 2])
    got = margins(probs.log(), labels)
    # sample 0: 0.6 - 0.35 and 0.55 - 0.25; sample 1 (label 2): 0.2 - 0.7 (wrong: negative) and 0.4 - 0.3
    assert got.flatten().tolist() == pytest.approx([0.25, -0.5, 0.30, 0.1], abs=1e-6)
    # without labels: the largest probability minus the second
    assert margins(probs.log(), None).flatten().tolist() == pytest.approx([0.25, 0.5, 0.30, 0.1], abs=1e-6)


def test_margin_routing_differs_from_confidence_where_the_runner_up_is_close():
    # Sample 0: the original has the higher p(label) (0.6 > 0.55) but a close runner-up (0.35), the teacher a
    # spread-out rest: confidence keeps the original, margin takes the teacher. Sample 1: the same outputs, a
    # tie, goes to the original. Sample 2: the teacher is wrong (negative margin), the original right.
    original = torch.tensor([[0.6, 0.35, 0.05], [0.5, 0.3, 0.2], [0.5, 0.4, 0.1]]).log()
    teacher = torch.tensor([[0.55, 0.25, 0.20], [0.5, 0.3, 0.2], [0.3, 0.6, 0.1]]).log()[None]
    labels = torch.tensor([0, 0, 0])
    assert route(original, teacher, labels, "confidence").tolist() == [0, 0, 0]
    assert route(original, teacher, labels, "margin").tolist() == [1, 0, 0]
    # kl_dp_margin is kl_dp with routing=margin, and distils toward the routed model
    student = torch.randn(3, 3)
    method = create_method("kl_dp_margin")
    assert method.params.routing == "margin"
    out = method.loss(StepInputs(student, labels, teacher, original))
    target = torch.where(torch.tensor([True, False, False])[:, None], teacher[0], original)
    assert out.loss.item() == pytest.approx(kl_to_target(target, student, 1.0).item(), rel=1e-6)
    assert out.stats["teacher_share"] == pytest.approx(1 / 3)
    same = create_method("kl_dp", routing="margin").loss(StepInputs(student, labels, teacher, original))
    assert same.loss.item() == pytest.approx(out.loss.item())


def test_margin_routing_without_labels_and_several_teachers():
    original = torch.tensor([[0.5, 0.4, 0.1]]).log()
    teachers = torch.stack([torch.tensor([[0.45, 0.10, 0.45]]).log(), torch.tensor([[0.1, 0.3, 0.6]]).log()])
    # margins without labels: 0.1, 0.0, 0.3 -> the second teacher; with label 0: 0.1, 0.0, -0.5 -> the original
    assert route(original, teachers, None, "margin").tolist() == [2]
    assert route(original, teachers, torch.tensor([0]), "margin").tolist() == [0]
    method = create_method("kl_dp_margin", supervised=False)
    assert method.targets(original, teachers, torch.tensor([0]))["choice"].tolist() == [2]


def test_kl_dp_loss_is_kl_to_routed_target():
    torch.manual_seed(0)
    student, original, teacher = torch.randn(6, 4), torch.randn(6, 4), torch.randn(1, 6, 4)
    labels = torch.randint(0, 4, (6,))
    method = create_method("kl_dp", temperature=2.0)
    out = method.loss(StepInputs(student, labels, teacher, original))
    choice = route(original, teacher, labels)
    target = torch.where((choice > 0)[:, None], teacher[0], original)
    assert out.loss.item() == pytest.approx(kl_to_target(target, student, 2.0).item(), rel=1e-6)
    assert out.stats["teacher_share"] == pytest.approx(float((choice > 0).float().mean()))


def test_create_method_errors():
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        create_method("nope")
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        create_method("kl", lambda_=1)
    with pytest.raises(ConfigError, match="below its minimum"):
        create_method("kl", temperature=0)
    with pytest.raises(ConfigError, match="not one of"):
        create_method("kl_dp", routing="random")
    with pytest.raises(ConfigError, match="not a valid"):
        create_method("kl", temperature="hot")
    assert create_method("kl_dp", supervised="false").params.supervised is False


@pytest.mark.parametrize("name, hparams, teachers", [("kl_dp", {}, 1), ("kl_dp", {"supervised": False}, 1), ("kl_dp", {}, 3), ("kl_dp_margin", {}, 1), ("kl_dp_margin", {"supervised": False}, 3), ("kl_dp", {"routing": "teacher_on_positive_flips", "flips_from": "original"}, 1), ("kl", {"temperature": 4.0}, 1)])
def test_targets_computed_once_equal_per_batch_targets(name, hparams, teachers):
    """What fixed_targets computes over the whole set gives the same loss and stats as computing per batch."""
    torch.manual_seed(1)
    n, c = 50, 6
    teacher, original, labels = torch.randn(teachers, n, c), torch.randn(n, c), torch.randint(0, c, (n,))
    method = create_method(name, **hparams)
    fixed = method.fixed_targets(teacher, original, labels)
    rows = torch.tensor([3, 17, 4, 40, 41])
    student = torch.randn(len(rows), c)
    per_batch = method.loss(StepInputs(student, labels[rows], teacher[:, rows], original[rows]))
    precomputed = method.loss(StepInputs(student, labels[rows], teacher[:, rows], original[rows], fixed={k: v[rows] for k, v in fixed.items()}))
    assert precomputed.loss.item() == pytest.approx(per_batch.loss.item(), rel=1e-6)
    assert set(precomputed.stats) == set(per_batch.stats)
    for key in per_batch.stats:
        assert float(precomputed.stats[key]) == pytest.approx(float(per_batch.stats[key]))


# Four samples of true class 0, one per case of (original student right?, student being trained right?);
# the teacher is right on samples 0 and 1 and wrong on 2 and 3.
FLIP_LABELS = torch.tensor([0, 0, 0, 0])
FLIP_ORIGINAL = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # wrong, right, wrong, right
FLIP_CURRENT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 3.0]])  # right, wrong, right, wrong
FLIP_TEACHER = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 1.0]])[None]  # right, right, wrong, wrong


@pytest.mark.parametrize("routing, flips_from, teacher_rows", [
    # positive flips (teacher right, student wrong): the current student is wrong on 1 only, the original on 0 only
    ("teacher_on_positive_flips", "current", [1]),
    ("teacher_on_positive_flips", "original", [0]),
    # negative flips (student right, teacher wrong) go to the original student, the rest to the teacher
    ("student_on_negative_flips", "current", [0, 1, 3]),
    ("student_on_negative_flips", "original", [0, 1, 2]),
])
def test_flip_ablations_decide_flips_from_the_chosen_student_and_target_the_frozen_models(routing, flips_from, teacher_rows):
    method = create_method("kl_dp", routing=routing, flips_from=flips_from)
    out = method.loss(StepInputs(FLIP_CURRENT, FLIP_LABELS, FLIP_TEACHER, FLIP_ORIGINAL))
    to_teacher = torch.zeros(4, dtype=torch.bool)
    to_teacher[teacher_rows] = True
    target = torch.where(to_teacher[:, None], FLIP_TEACHER[0], FLIP_ORIGINAL)  # never the current student's own logits
    assert out.loss.item() == pytest.approx(kl_to_target(target, FLIP_CURRENT, 1.0).item(), rel=1e-6)
    assert out.stats["teacher_share"] == pytest.approx(len(teacher_rows) / 4)


def test_flip_ablations_default_to_the_current_student_and_are_then_never_precomputed():
    assert create_method("kl_dp", routing="teacher_on_positive_flips").params.flips_from == "current"
    teacher, original, labels = FLIP_TEACHER, FLIP_ORIGINAL, FLIP_LABELS
    for routing in ("teacher_on_positive_flips", "student_on_negative_flips"):
        assert create_method("kl_dp", routing=routing).fixed_targets(teacher, original, labels) is None
        assert create_method("kl_dp", routing=routing, flips_from="original").fixed_targets(teacher, original, labels) is not None
    # The paper's confidence routing always compares with the original student: precomputed whatever flips_from says.
    for flips_from in ("current", "original"):
        method = create_method("kl_dp", flips_from=flips_from)
        fixed = method.fixed_targets(teacher, original, labels)
        assert fixed["choice"].tolist() == route(original, teacher, labels).tolist()
        assert method.loss(StepInputs(FLIP_CURRENT, labels, teacher, original)).loss.item() == pytest.approx(method.loss(StepInputs(FLIP_CURRENT, labels, teacher, original, fixed=fixed)).loss.item())


def test_cached_and_online_targets_train_the_same_student_with_flips_from_the_current_student(tiny_data):
    """With cached targets the routing must still follow the student as it trains, as online it does."""
    from ktransfer.engine import Engine, TrainConfig
    from ktransfer.models.base import Model
    from ktransfer.models.zoo import MLP
    from ktransfer.predictions import PredictionCache
    from ktransfer.targets import CachedTargets, OnlineTargets

    transfer_set, _ = tiny_data
    torch.manual_seed(0)
    teacher, original = Model(MLP(hidden=16).eval(), "teacher"), Model(MLP(hidden=16).eval(), "original")
    students = []
    for source in (CachedTargets([teacher], original, transfer_set, PredictionCache(enabled=False)), OnlineTargets([teacher], original)):
        student = Model(MLP(hidden=16), "student")
        student.module.load_state_dict(original.module.state_dict())
        method = create_method("kl_dp", routing="teacher_on_positive_flips")
        engine = Engine(student, method, transfer_set, TrainConfig(epochs=1, lr=0.5, batch_size=64), source)
        assert engine.fixed is None
        engine.run()
        students.append(student.module.state_dict())
    for key, value in students[0].items():
        assert torch.allclose(value, students[1][key], atol=1e-6), key
