import math

import numpy as np
import pytest

from ktransfer import metrics, significance


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


# --------------------------------------------------------------------------- significance

from fractions import Fraction  # noqa: E402


def exact_mcnemar(gain: int, loss: int) -> Fraction:
    """The definition, in fractions: 2·P(X ≤ min) for X ~ binomial(gain + loss, 1/2), capped at 1."""
    n, k = gain + loss, min(gain, loss)
    coefficient = tail = math.comb(n, k)
    for j in range(k, 0, -1):  # C(n, j-1) = C(n, j)·j / (n-j+1), downwards from the top term
        coefficient = coefficient * j // (n - j + 1)
        tail += coefficient
    return min(Fraction(1), 2 * Fraction(tail, 2**n))


def test_mcnemar_hand_computed_cases():
    assert metrics.mcnemar_p_value(0, 5) == 0.0625  # 2 · (1/2)^5
    assert metrics.mcnemar_p_value(1, 9) == 22 / 1024  # 2 · (1 + 10) / 2^10
    assert metrics.mcnemar_p_value(0, 1) == 1.0  # 2 · 1/2
    assert metrics.mcnemar_p_value(0, 0) == 1.0
    assert metrics.mcnemar_p_value(7, 7) == 1.0
    assert metrics.mcnemar_p_value(2, 8) == 2 * (1 + 10 + 45) / 1024


@pytest.mark.parametrize("gain,loss", [(3, 7), (10, 30), (49, 51), (200, 260), (0, 1074), (5000, 5300), (5400, 4900), (9000, 9400), (5, 15000)])
def test_mcnemar_matches_the_definition_on_both_sides_of_the_integer_limit(gain, loss):
    # 9000 + 9400 and 5 + 15000 discordant pairs lie above EXACT_INTEGER_LIMIT: the log-space sum.
    assert metrics.mcnemar_p_value(gain, loss) == pytest.approx(float(exact_mcnemar(gain, loss)), rel=1e-12, abs=0)


def test_mcnemar_log_space_sum_agrees_with_whole_numbers():
    for n, k in [(1000, 480), (4000, 1950), (10_000, 4900), (10_000, 10)]:
        log_p = math.log(2.0) + significance._log_binomial_half_cdf(n, k)
        assert math.exp(log_p) == pytest.approx(float(exact_mcnemar(k, n - k)), rel=1e-12)


def test_mcnemar_large_counts_stay_finite_and_ordered():
    # Hundreds of thousands of discordant samples: no overflow, no underflow on the way, p in [0, 1].
    assert metrics.mcnemar_p_value(250_000, 250_000) == 1.0
    close = metrics.mcnemar_p_value(249_000, 251_000)
    far = metrics.mcnemar_p_value(248_000, 252_000)
    assert 0 < far < close < 0.01
    # ln p from the normal approximation, z = 2000 / sqrt(500000) ≈ 2.83 → p ≈ 0.0047
    assert close == pytest.approx(math.erfc(2000 / math.sqrt(500_000) / math.sqrt(2)), rel=0.02)
    assert metrics.mcnemar_p_value(3, 400_000) == 0.0  # far below the smallest float


@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_identities(seed):
    rng = np.random.default_rng(seed)
    for _ in range(50):
        gain, loss = (int(x) for x in rng.integers(0, 300, 2))
        p = metrics.mcnemar_p_value(gain, loss)
        assert 0 <= p <= 1
        assert p == metrics.mcnemar_p_value(loss, gain)  # symmetric in the two counts
        # more losses against the same gains (or the reverse) is stronger evidence
        if loss >= gain:
            assert metrics.mcnemar_p_value(gain, loss + 1) <= p
        else:
            assert metrics.mcnemar_p_value(gain + 1, loss) <= p
        # with n fixed, a more lopsided split has a smaller p
        n = gain + loss
        ps = [metrics.mcnemar_p_value(k, n - k) for k in range(0, n // 2 + 1)]
        assert all(a <= b for a, b in zip(ps, ps[1:]))


def test_mcnemar_rejects_non_counts():
    for bad in [(-1, 3), (1.5, 2), (True, 2)]:
        with pytest.raises(ValueError, match="count"):
            metrics.mcnemar_p_value(*bad)


def test_transfer_metrics_carry_counts_and_p_value():
    labels = np.zeros(20, dtype=int)
    before = np.array([0] * 10 + [1] * 10)  # right on 10
    after = np.array([0] * 9 + [1] + [0] * 10)  # one loss (sample 9), ten gains (10..19)
    m = metrics.transfer_metrics(labels, before, after)
    assert (m["gain_count"], m["loss_count"]) == (10, 1)
    assert m["gain_count"] - m["loss_count"] == round(m["delta"] * m["n_eval"] / 100)
    assert m["p_value"] == 2 * (1 + 11) / 2**11
    same = metrics.transfer_metrics(labels, before, before)
    assert same["p_value"] == 1.0 and same["gain_count"] == same["loss_count"] == 0


def test_paired_p_value_counts_only_discordant_samples():
    labels = np.arange(12) % 3
    first = labels.copy()
    second = labels.copy()
    second[:6] = (labels[:6] + 1) % 3  # second wrong where first is right on six samples
    first[10:] = (labels[10:] + 1) % 3  # both wrong on two samples
    second[10:] = (labels[10:] + 2) % 3
    assert metrics.paired_counts(labels, first, second) == (6, 0)
    assert metrics.paired_p_value(labels, first, second) == 2 / 2**6
    assert metrics.paired_p_value(labels, second, first) == 2 / 2**6
    # the same as the p of a "transfer" from first to second
    assert metrics.paired_p_value(labels, first, second) == metrics.transfer_metrics(labels, first, second)["p_value"]


def test_benjamini_hochberg_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.5; thresholds k/5·0.05: 0.01, 0.02, 0.03, 0.04, 0.05
    # largest k with p_(k) ≤ threshold: k = 4 (0.04 ≤ 0.04): the four smallest are discoveries
    assert metrics.benjamini_hochberg(p, fdr=0.05) == [True, True, True, True, False]
    assert metrics.benjamini_hochberg(p, fdr=0.03) == [True, False, False, True, False]  # thresholds 0.006, 0.012, ...
    assert metrics.benjamini_hochberg(p, fdr=0.02) == [False] * 5  # 0.005 > 0.004
    adjusted = metrics.benjamini_hochberg_adjusted(p)
    assert adjusted == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])


def test_benjamini_hochberg_properties():
    rng = np.random.default_rng(3)
    p = list(rng.random(40) ** 3)
    marks = metrics.benjamini_hochberg(p, fdr=0.1)
    adjusted = metrics.benjamini_hochberg_adjusted(p)
    assert all(q >= x for q, x in zip(adjusted, p)) and all(q <= 1 for q in adjusted)
    # discoveries are exactly the smallest p-values, and at most those below the fdr itself
    cut = max((x for x, m in zip(p, marks) if m), default=-1)
    assert marks == [x <= cut for x in p]
    assert sum(marks) <= sum(1 for x in p if x <= 0.1)
    # Bonferroni's discoveries are a subset of BH's
    assert all(m for x, m in zip(p, marks) if x <= 0.1 / len(p))
    # missing tests are never discoveries and do not count among the tests
    assert metrics.benjamini_hochberg([0.01, None, float("nan"), 0.02]) == [True, False, False, True]
    assert metrics.benjamini_hochberg_adjusted([0.01, None, 0.02])[1] is None
    assert metrics.benjamini_hochberg([]) == []


def test_significance_summary():
    summary = metrics.significance_summary([0.001, 0.04, 0.2, 0.9, None], alpha=0.05, fdr=0.05)
    assert summary["tests"] == 4
    assert summary["below_alpha"] == 2
    assert summary["expected_by_chance"] == pytest.approx(0.2)
    assert summary["discoveries"] == 1  # 0.001 ≤ 0.0125; 0.04 > 0.025
    assert metrics.expected_false_positives(120) == pytest.approx(6.0)


# --------------------------------------------------------------------------- the ceiling


def test_ensemble_and_oracle_hand_computed():
    labels = [0, 1, 2, 0]
    student = np.array([[0.6, 0.3, 0.1],   # right
                        [0.5, 0.4, 0.1],   # wrong (0)
                        [0.2, 0.7, 0.1],   # wrong (1)
                        [0.2, 0.5, 0.3]])  # wrong (1)
    teacher = np.array([[0.1, 0.8, 0.1],   # wrong (1)
                        [0.1, 0.8, 0.1],   # right
                        [0.3, 0.3, 0.4],   # right
                        [0.4, 0.1, 0.5]])  # wrong (2)
    # mean: [.35 .55 .1] -> 1 wrong; [.3 .6 .1] -> 1 right; [.25 .5 .25] -> 1 wrong; [.3 .3 .4] -> 2 wrong
    assert list(metrics.ensemble_predictions([student, teacher])) == [1, 1, 1, 2]
    assert metrics.ensemble_accuracy(labels, [student, teacher]) == 25.0
    assert metrics.oracle_accuracy(labels, [student.argmax(1), teacher.argmax(1)]) == 75.0
    c = metrics.ceiling(labels, [student, teacher])
    assert c == {"ensemble_acc": 25.0, "ensemble_delta": 0.0, "oracle_acc": 75.0}


def test_capture_is_delta_over_ensemble_delta_and_undefined_without_a_gain():
    assert metrics.capture(1.0, 4.0) == 0.25
    assert metrics.capture(-0.5, 2.0) == -0.25
    assert metrics.capture(1.0, 0.0) is None and metrics.capture(1.0, -2.0) is None
    assert metrics.capture(None, 2.0) is None and metrics.capture(1.0, None) is None
    assert metrics.ceiling_fields({"ensemble_acc": 80.0, "ensemble_delta": 2.0, "oracle_acc": 90.0}, 0.5) == {
        "ensemble_acc": 80.0, "ensemble_delta": 2.0, "oracle_acc": 90.0, "capture": 0.25}
    assert metrics.ceiling_fields(None, 0.5) == {"ensemble_acc": None, "ensemble_delta": None, "oracle_acc": None, "capture": None}


@pytest.mark.parametrize("seed", range(10))
def test_ceiling_identities(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 300)), int(rng.integers(2, 8))
    labels = rng.integers(0, c, n)
    probs = [metrics.softmax(rng.normal(size=(n, c)) * 3) for _ in range(3)]
    preds = [p.argmax(1) for p in probs]
    accs = [metrics.accuracy(labels, p) for p in preds]
    assert metrics.oracle_accuracy(labels, preds[:2]) >= max(accs[:2])
    assert metrics.oracle_accuracy(labels, preds) >= metrics.oracle_accuracy(labels, preds[:2])  # a model more: never lower
    # A model with itself is the model: ensemble and oracle equal its accuracy, ensemble Δ is 0.
    assert list(metrics.ensemble_predictions([probs[0], probs[0]])) == list(preds[0])
    assert metrics.ceiling(labels, [probs[0], probs[0]]) == {"ensemble_acc": accs[0], "ensemble_delta": 0.0, "oracle_acc": accs[0]}
    assert metrics.ceiling(labels, [probs[0]])["ensemble_acc"] == accs[0]


def test_the_ensemble_can_beat_the_oracle():
    # Neither model ranks class 2 first, but their mean does: oracle ≥ ensemble is no identity.
    labels = [2]
    a, b = np.array([[0.5, 0.0, 0.45]]), np.array([[0.0, 0.5, 0.45]])
    assert metrics.ensemble_accuracy(labels, [a, b]) == 100.0
    assert metrics.oracle_accuracy(labels, [a.argmax(1), b.argmax(1)]) == 0.0


def test_softmax_is_stable_and_sums_to_one():
    p = metrics.softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]]))
    assert np.allclose(p, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]])


# --------------------------------------------------------------------------- transfer-set diagnostics


def test_true_class_probability_and_entropy_hand_computed():
    labels = [0, 2]
    probs = np.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    assert metrics.mean_true_class_probability(labels, probs) == 50.0  # (0.5 + 0.5) / 2
    expected = (math.log(2) + (0.5 * math.log(4) + 0.5 * math.log(2))) / 2  # ln 2 and 1.5 ln 2
    assert math.isclose(metrics.mean_entropy(probs), expected)
    assert metrics.mean_entropy(np.eye(3)) == 0.0
    assert math.isclose(metrics.mean_entropy(np.full((2, 4), 0.25)), math.log(4))


def test_dp_routing_summary_follows_kl_dp_and_counts_useful_routes():
    import torch

    from ktransfer.methods.kl import route

    labels = np.array([0, 1, 2, 0, 1])
    # true-class probabilities: student .7 .2 .3 .4 .5 ; teacher .9 .6 .3 .2 .5 -> routed 0, 1 (ties 2 and 4 stay with the student)
    student = np.array([[.7, .2, .1], [.5, .2, .3], [.4, .3, .3], [.4, .5, .1], [.3, .5, .2]])
    teacher = np.array([[.9, .05, .05], [.2, .6, .2], [.4, .3, .3], [.2, .7, .1], [.3, .5, .2]])
    routed = metrics.dp_routed_to_teacher(labels, student, teacher)
    assert list(routed) == [True, True, False, False, False]
    # The method's own rule on the same distributions (as logits: log-probabilities) agrees.
    choice = route(torch.tensor(np.log(student)), torch.tensor(np.log(teacher)).unsqueeze(0), torch.tensor(labels))
    assert list(choice > 0) == list(routed)
    s = metrics.dp_routing_summary(labels, student, teacher)
    # routed 0: both right (not useful); routed 1: teacher right, student wrong (useful)
    assert s == {"n": 5, "routed_count": 2, "routed": 40.0, "routed_useful_count": 1, "routed_useful": 50.0}
    none = metrics.dp_routing_summary([0], np.array([[0.9, 0.1]]), np.array([[0.5, 0.5]]))
    assert none["routed_count"] == 0 and math.isnan(none["routed_useful"])
