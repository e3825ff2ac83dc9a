import math

import numpy as np
import pytest

from ktransfer import metrics


def test_hand_computed_case():
    labels = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    before = [0, 1, 2, 0, 0, 0, 0, 2, 3, 4]  # right on 0,1,2,5,7,8,9 -> 7/10
    after = [0, 1, 0, 3, 4, 0, 0, 2, 3, 0]  # right on 0,1,3,4,5,7,8 -> 7/10
    teacher = [1, 1, 2, 3, 4, 1, 1, 2, 0, 4]  # right on 1,2,3,4,6,7,9 -> 7/10
    m = metrics.transfer_metrics(labels, before, after, teacher)
    assert m["acc_before"] == 70.0 and m["acc_after"] == 70.0
    assert m["knowledge_gain"] == 20.0  # samples 3, 4
    assert m["knowledge_loss"] == 20.0  # samples 2, 9
    assert m["delta"] == 0.0
    # before wrong & teacher right: 3, 4, 6 ; before right & teacher wrong: 0, 5, 8
    assert m["pos_flips_before"] == 30.0 and m["neg_flips_before"] == 30.0
    # after wrong & teacher right: 2, 6, 9 ; after right & teacher wrong: 0, 5, 8
    assert m["pos_flips_after"] == 30.0 and m["neg_flips_after"] == 30.0
    assert m["teacher_acc"] == 70.0 and m["n_eval"] == 10


@pytest.mark.parametrize("seed", range(20))
def test_delta_equals_gain_minus_loss(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 500)), int(rng.integers(2, 12))
    labels, before, after = (rng.integers(0, c, n) for _ in range(3))
    m = metrics.transfer_metrics(labels, before, after)
    assert math.isclose(m["delta"], m["knowledge_gain"] - m["knowledge_loss"], abs_tol=1e-9)
    gain, loss = metrics.flip_counts(labels, before, after)
    assert gain - loss == int((after == labels).sum()) - int((before == labels).sum())


def test_flip_matrices_match_pairwise_functions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 300)
    predictions = {name: np.where(rng.random(300) < p, labels, rng.integers(0, 5, 300)) for name, p in [("a", 0.9), ("b", 0.6), ("c", 0.3)]}
    names, pos, neg = metrics.flip_matrices(labels, predictions)
    for i, s in enumerate(names):
        for j, t in enumerate(names):
            assert pos[i, j] == pytest.approx(metrics.positive_flips(labels, predictions[s], predictions[t]))
            assert neg[i, j] == pytest.approx(metrics.negative_flips(labels, predictions[s], predictions[t]))
    assert np.allclose(pos, neg.T)  # what s gains from t is what t loses against s
    assert np.all(np.diag(pos) == 0)


def test_success_rate_is_strict():
    assert metrics.success_rate([0.5, 0.0, -0.1, 0.2]) == 50.0
    assert math.isnan(metrics.success_rate([]))


def test_class_concentration():
    counts = [50, 30, 10, 5, 5, 0, 0, 0, 0, 0]
    assert metrics.top_classes(counts, 50) == [0]
    assert metrics.top_classes(counts, 80) == [0, 1]
    assert metrics.top_classes(counts, 2) == [0]
    c = metrics.class_concentration(counts)
    p = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert c["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert c["uniform_entropy"] == pytest.approx(math.log(10))
    assert metrics.entropy([7] * 10) == pytest.approx(math.log(10))


def test_per_class_positive_flips():
    labels = [0, 0, 1, 1, 2]
    student = [1, 1, 0, 1, 0]
    teacher = [0, 0, 1, 0, 2]
    assert metrics.per_class_positive_flips(labels, student, teacher, 3).tolist() == [2, 1, 1]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.transfer_metrics([0, 1], [0, 1, 1], [0, 1])
