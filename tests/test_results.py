"""Summaries of results: the paper's per-student success rate, controls kept apart, comparisons with controls."""

import statistics

import pytest
import torch

from ktransfer.controls import attach_controls, as_control_record, control_method
from ktransfer.results import pair_means, pool_seeds, summarize, summarize_controls, success_by_student


def transfer_record(student, teacher, delta, p_value=0.5, seed=0, **extra):
    return {
        "student": student, "teacher": teacher, "method": "kl", "delta": delta, "p_value": p_value, "seed": seed,
        "acc_before": 80.0, "acc_after": 80.0 + delta, "teacher_acc": 85.0 if delta > 0 else 75.0,
        "knowledge_gain": max(delta, 0), "knowledge_loss": max(-delta, 0), **extra,
    }


def test_success_rate_is_the_median_over_students_of_each_students_share_of_teachers():
    records = [
        transfer_record("A", "t1", 1.0), transfer_record("A", "t2", -1.0), transfer_record("A", "t3", 0.5),  # 2/3
        transfer_record("B", "t1", -0.2), transfer_record("B", "t2", -0.1), transfer_record("B", "t3", 0.3),  # 1/3
        transfer_record("C", "t1", 0.4),  # 1/1
    ]
    summary = summarize(records)["kl"]
    # median of 66.7, 33.3 and 100 is 66.7; pooling the pairs would give 4/7 = 57.1
    assert summary["success_rate"] == pytest.approx(200 / 3)
    assert summary["success_by_student"] == pytest.approx({"A": 200 / 3, "B": 100 / 3, "C": 100.0})
    assert summary["positive"] == 4 and summary["pairs"] == 7


def test_significant_success_counts_only_significant_positive_deltas_and_chance_is_stated():
    records = [
        transfer_record("A", "t1", 1.0, p_value=0.01), transfer_record("A", "t2", 0.2, p_value=0.4),
        transfer_record("B", "t1", 0.9, p_value=0.001), transfer_record("B", "t2", -2.0, p_value=0.0),
    ]
    summary = summarize(records)["kl"]
    assert summary["success_rate_significant"] == 50.0  # A: 1/2, B: 1/2
    assert summary["significant_positive"] == 2 and summary["significant_negative"] == 1
    assert summary["expected_by_chance"] == pytest.approx(0.05 * 4)
    # a p-value of exactly 0 is significant, not "missing"
    assert success_by_student([transfer_record("A", "t", 1.0, p_value=0.0)], significant=True) == {"kl": {"A": 100.0}}


def test_seeds_average_within_a_pair_and_give_a_spread_of_the_mean():
    records = [transfer_record("A", "t1", 1.0, seed=0), transfer_record("A", "t1", -0.4, seed=1), transfer_record("A", "t2", 0.2, seed=0), transfer_record("A", "t2", 0.6, seed=1)]
    summary = summarize(records)["kl"]
    assert summary["seeds"] == 2 and summary["success_rate"] == 100.0  # t1 mean +0.3, t2 mean +0.4
    # seed 0 mean 0.6, seed 1 mean 0.1: sample standard deviation 0.3536
    assert summary["mean_delta_std_over_seeds"] == pytest.approx(0.5 / 2**0.5)


def test_controls_stay_out_of_method_summaries_and_get_their_own():
    control = as_control_record(transfer_record("A", "A", -0.3, p_value=0.2), "ce")
    assert control["teacher"] is None and control["teacher_acc"] is None and control["control"] is True
    records = [transfer_record("A", "t1", 0.5), control]
    assert set(summarize(records)) == {"kl"} and summarize(records)["kl"]["pairs"] == 1
    controls = summarize_controls(records)
    assert set(controls) == {"ce"} and controls["ce"]["mean_delta"] == pytest.approx(-0.3) and controls["ce"]["by_student"] == {"A": pytest.approx(-0.3)}


def test_attach_controls_compares_each_transfer_with_the_control_of_its_own_setting():
    labels = torch.zeros(6, dtype=torch.long)
    common = {"epochs": 3, "lr": 0.01, "batch_size": 128, "seed": 0, "transfer_data": "T", "eval_data": "E", "augment": "none"}
    ce = as_control_record({**transfer_record("A", "A", 0.0), **common, "acc_after": 50.0}, "ce")
    other_lr = as_control_record({**transfer_record("A", "A", 0.0), **common, "lr": 0.1, "acc_after": 0.0}, "ce")
    transfer = {**transfer_record("A", "t1", 2.0), **common, "acc_after": 100 * 5 / 6}
    predictions = {id(ce): torch.tensor([0, 0, 0, 1, 1, 1]), id(other_lr): torch.ones(6, dtype=torch.long), id(transfer): torch.tensor([0, 0, 0, 0, 0, 1])}
    attach_controls([ce, other_lr, transfer], predictions, labels)
    # only the control at the transfer's own learning rate counts; no self control ran, so no self fields
    assert transfer["delta_vs_control"] == pytest.approx(100 * 2 / 6)
    assert (transfer["gain_count_vs_control"], transfer["loss_count_vs_control"]) == (2, 0)
    assert transfer["p_value_vs_control"] == pytest.approx(0.5)  # 2 discordant, both one way: 2 · 1/4
    assert "delta_vs_self" not in transfer and "delta_vs_control" not in ce


def test_control_methods_are_fine_tuning_and_self_distillation():
    assert control_method("ce").name == "ce"
    own = control_method("self")
    assert own.name == "kl_dp" and own.params.routing == "self"
    with pytest.raises(ValueError, match="unknown control"):
        control_method("teacher")


def test_median_capture_is_over_pairs_with_a_positive_ensemble_delta_seeds_averaged():
    from rich.console import Console

    from ktransfer import tables

    records = [
        transfer_record("A", "t1", 1.0, seed=0, ensemble_delta=4.0, capture=0.25), transfer_record("A", "t1", 0.0, seed=1, ensemble_delta=4.0, capture=0.0),  # mean Δ 0.5: 12.5%
        transfer_record("A", "t2", 1.0, ensemble_delta=2.0, capture=0.5),  # 50%
        transfer_record("B", "t1", -0.3, ensemble_delta=1.0, capture=-0.3),  # -30%
        transfer_record("B", "t2", 0.4, ensemble_delta=-1.0, capture=None),  # no ceiling: not counted
        transfer_record("C", "t1", 0.2),  # an older record without the keys: not counted
    ]
    summary = summarize(records)["kl"]
    assert summary["capture_pairs"] == 3 and summary["median_capture"] == pytest.approx(0.125)
    assert summary["ceiling_pairs"] == 4 and summary["mean_ensemble_delta"] == pytest.approx((4 + 2 + 1 - 1) / 4)
    assert summarize([transfer_record("A", "t", 1.0, ensemble_delta=0.0, capture=None)])["kl"]["median_capture"] is None
    console = Console(width=400, record=True)
    console.print(tables.summary_table(summarize(records), 100))
    console.print(tables.pairs_table(records, 100))
    text = console.export_text()
    assert "median capture" in text and "12% (3 pairs)" in text  # 0.125 shown to the whole percent
    assert "ens Δ" in text and "+4.00" in text and "25%" in text and "-30%" in text


def counted_record(teacher, count, n_eval=10_000, seed=0):
    """A record as a transfer writes it: Δ is the percentage of an integer count ``count`` over ``n_eval``."""
    gain, loss = max(count, 0), max(-count, 0)
    return transfer_record("s", teacher, 100.0 * count / n_eval, seed=seed, n_eval=n_eval, gain_count=gain, loss_count=loss)


def test_a_pair_whose_seed_counts_sum_to_zero_has_mean_delta_exactly_zero_and_is_no_success():
    # Counts -30, +2, +28 over 10000: the float percentages average to 1.27e-17, the true mean is 0 (SPEC §2: Δ > 0 strictly)
    zero = [counted_record("t0", count, seed=seed) for seed, count in enumerate((-30, 2, 28))]
    assert sum(r["delta"] for r in zero) / 3 != 0.0  # the float mean this test guards against
    assert pair_means(zero) == {("kl", "s", "t0"): 0.0}
    assert success_by_student(zero) == {"kl": {"s": 0.0}}
    # one count more is a real (tiny) gain: +1/3 of a sample per seed
    plus = [counted_record("t1", count, seed=seed) for seed, count in enumerate((-30, 2, 29))]
    assert pair_means(plus)[("kl", "s", "t1")] == pytest.approx(100 / 3 / 10_000)
    assert success_by_student(zero + plus) == {"kl": {"s": 50.0}}  # t1 is a success, t0 is not


def test_the_exact_pair_mean_recovers_counts_from_delta_and_n_eval_when_counts_are_absent():
    records = [counted_record("t", count, seed=seed) for seed, count in enumerate((-30, 2, 28))]
    for r in records:
        del r["gain_count"], r["loss_count"]
    assert pair_means(records) == {("kl", "s", "t"): 0.0}


def seeded_record(seed: int, delta: float, gain: int, loss: int, teacher: str = "zoo:t") -> dict:
    return {
        "student": "zoo:s", "teacher": teacher, "method": "kl_dp", "seed": seed, "lr": 0.01, "hparams": {}, "delta": delta, "gain_count": gain, "loss_count": loss,
        "p_value": None, "acc_before": 80.0, "acc_after": 80.0 + delta, "teacher_acc": 85.0, "knowledge_gain": gain / 2, "knowledge_loss": loss / 2,
        "delta_vs_self": delta - 0.5, "gain_count_vs_self": gain, "loss_count_vs_self": 1, "p_value_vs_self": None,
    }


def test_seeds_pool_per_pair_mean_std_and_mcnemar_on_the_summed_counts():
    from ktransfer.metrics import mcnemar_p_value

    records = [seeded_record(0, 2.5, 5, 0), seeded_record(1, 2.5, 5, 0), seeded_record(2, 1.0, 3, 1)]
    for r in records:  # each seed's own test
        r["p_value"] = mcnemar_p_value(r["gain_count"], r["loss_count"])
    assert [r["p_value"] for r in records] == [pytest.approx(2 / 32), pytest.approx(2 / 32), pytest.approx(10 / 16)]  # none below 0.05
    (pooled,) = pool_seeds(records)
    assert pooled["seeds"] == 3 and pooled["seed"] is None
    assert pooled["delta"] == pytest.approx(2.0) and pooled["delta_std"] == pytest.approx(statistics.stdev([2.5, 2.5, 1.0]))
    # 13 gains and 1 loss over the (seed, image) pairs: p = 2 · (1 + 14) / 2^14
    assert (pooled["gain_count"], pooled["loss_count"]) == (13, 1) and pooled["p_value"] == pytest.approx(30 / 2**14)
    assert (pooled["gain_count_vs_self"], pooled["loss_count_vs_self"]) == (13, 3) and pooled["p_value_vs_self"] == pytest.approx(mcnemar_p_value(13, 3))
    summary = summarize(records)["kl_dp"]
    # one pair, significant once its seeds are pooled, though no seed alone is
    assert summary["pairs"] == 1 and summary["runs"] == 3 and summary["significant_positive"] == 1 and summary["success_rate_significant"] == 100.0
    assert summary["expected_by_chance"] == pytest.approx(0.05) and summary["beats_self_significantly"] == 1
    # a pair with one seed is its record; a pair without counts (an older file) has no pooled p-value
    older = [{**seeded_record(0, 1.0, 0, 0, "zoo:u"), "p_value": 0.3}, {**seeded_record(1, 1.0, 0, 0, "zoo:u"), "p_value": 0.3}]
    for r in older:
        del r["gain_count"], r["loss_count"]
    assert pool_seeds(records[:1])[0] == {**records[0], "seeds": 1}
    assert pool_seeds(older)[0]["p_value"] is None


def test_the_pooled_transfers_table_shows_mean_and_spread():
    from rich.console import Console

    from ktransfer import tables

    records = [seeded_record(0, 2.5, 5, 0), seeded_record(1, 1.5, 3, 0)]
    console = Console(width=400, record=True)
    console.print(tables.pairs_table(records, 200, pool=True))
    text = console.export_text()
    assert "+2.00* ± 0.71" in text  # 8 gains, 0 losses pooled: p = 2/256, starred and "p pooled over seeds" in text and "seeds" in text
    assert text.count("kl_dp") == 1  # one row for the pair
