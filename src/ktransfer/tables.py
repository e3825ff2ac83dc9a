"""Rich tables for the terminal: the zoo, the complementarity matrix, pairs and per-method summaries."""

from __future__ import annotations

from rich.table import Table

from .results import ALPHA, is_control, pool_seeds


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or value != value:
        return "–"
    return format(value, spec)


def zoo_table(rows: list[dict], n_eval: int) -> Table:
    table = Table(title=f"Zoo (accuracy on {n_eval:,} evaluation images)")
    for column in ("model", "family", "parameters", "accuracy %"):
        table.add_column(column, justify="left" if column in ("model", "family") else "right")
    for row in rows:
        table.add_row(row["name"], row["family"], f"{row['parameters']:,}", _fmt(row["accuracy"]))
    return table


def flip_matrix_table(names: list[str], matrix, n_eval: int, title: str | None = None, number_format: str = ".1f") -> Table:
    table = Table(title=title or f"Complementary knowledge ρ_pos %: samples the student (row) gets wrong and the teacher (column) right; n={n_eval:,}")
    table.add_column("student \\ teacher", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for i, row_name in enumerate(names):
        table.add_row(row_name, *["·" if i == j else _fmt(matrix[i][j], number_format) for j in range(len(names))])
    return table


def _delta(value, p_value, alpha: float = ALPHA) -> str:
    """A difference of accuracies, starred where its McNemar p-value is below ``alpha``."""
    text = _fmt(value, "+.2f")
    return text + ("*" if p_value is not None and value is not None and p_value < alpha else "")


def _p(value) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:.3f}" if value >= 0.001 else "<.001"


def pairs_table(records: list[dict], n_eval: int, pool: bool = False) -> Table:
    """One row per transfer record; with ``pool``, one per pair, its seeds pooled (mean ± std, McNemar on the summed counts: ktransfer.results.pool_seeds)."""
    transfers = [r for r in records if not is_control(r)]
    if pool:
        transfers = pool_seeds(transfers)
    pooled = pool and any(r.get("seeds", 1) > 1 for r in transfers)
    with_controls = any(r.get("delta_vs_control") is not None or r.get("delta_vs_self") is not None for r in transfers)
    title = f"Transfers (percent of {n_eval:,} evaluation images; * p < {ALPHA} by an exact McNemar test; share = data routed to the teacher)"
    if pooled:
        title += "; over seeds: mean ± std, p pooled over seeds"
    if with_controls:
        title += "; vs ce / vs self: accuracy after minus the ce / self control's"
    table = Table(title=title)
    columns = ["method", "teacher", "student", "seeds" if pooled else "seed", "teacher acc", "student acc", "Δ", "p"]
    if with_controls:
        columns += ["vs ce", "vs self"]
    columns += ["gain", "loss", "share", "ens Δ", "capture"]
    if not pooled and len({r.get("seed") for r in transfers}) <= 1:
        columns.remove("seed")
    for column in columns:
        # names never wrap or get cut; the numeric columns give way on a narrow terminal
        table.add_column(column, justify="left" if column in ("method", "teacher", "student") else "right", no_wrap=column in ("method", "teacher", "student"))
    for r in transfers:
        share = r.get("teacher_share")
        cells = {
            "method": r["method"], "teacher": str(r["teacher"]).removeprefix("zoo:"), "student": str(r["student"]).removeprefix("zoo:"), "seed": str(r.get("seed")),
            "seeds": str(r.get("seeds", 1)), "teacher acc": _fmt(r["teacher_acc"]), "student acc": _fmt(r["acc_before"]),
            "Δ": _spread(_delta(r["delta"], r.get("p_value")), r.get("delta_std")), "p": _p(r.get("p_value")),
            "vs ce": _spread(_delta(r.get("delta_vs_control"), r.get("p_value_vs_control")), r.get("delta_vs_control_std")),
            "vs self": _spread(_delta(r.get("delta_vs_self"), r.get("p_value_vs_self")), r.get("delta_vs_self_std")),
            "gain": _fmt(r["knowledge_gain"]), "loss": _fmt(r["knowledge_loss"]), "share": _fmt(share, ".0%") if share is not None else "–",
            "ens Δ": _fmt(r.get("ensemble_delta"), "+.2f"), "capture": _fmt(r.get("capture"), ".0%"),
        }
        table.add_row(*[cells[c] for c in columns])
    tests = len(transfers)
    if tests:
        below = sum(1 for r in transfers if r.get("p_value") is not None and r["p_value"] < ALPHA)
        pooling = (
            "p pooled over seeds: the exact McNemar test on the gain and loss counts summed over seeds, each (seed, image) pair a discordant unit. "
            if pooled else ""
        )
        table.caption = (
            f"{below} of {tests} Δs have p < {ALPHA}; about {ALPHA * tests:.1f} would by chance alone if no transfer changed anything. {pooling}"
            f"ens Δ: the ensemble of student and teacher (mean of probabilities) over the student, the pair's ceiling; "
            f"capture: Δ ÷ ens Δ (– where ens Δ ≤ 0)."
        )
    return table


def controls_table(summary: dict[str, dict], n_eval: int) -> Table:
    table = Table(title=f"Controls, no teacher (Δ in points on {n_eval:,} images): ce = fine-tuning on the labels, self = KL+DP toward the original student only")
    for column in ("control", "students", "mean Δ", "min Δ", "max Δ", f"p < {ALPHA}: Δ > 0", f"p < {ALPHA}: Δ < 0", "by student"):
        table.add_column(column, justify="left" if column in ("control", "by student") else "right", no_wrap=column == "control")
    for kind, s in summary.items():
        by_student = ", ".join(f"{str(name).removeprefix('zoo:')} {delta:+.2f}" for name, delta in s["by_student"].items())
        table.add_row(
            kind, str(s["students"]), _with_std(s["mean_delta"], s.get("mean_delta_std_over_seeds")), _fmt(s["min_delta"], "+.2f"), _fmt(s["max_delta"], "+.2f"),
            str(s["significant_positive"]), str(s["significant_negative"]), by_student,
        )
    return table


def _spread(text: str, std) -> str:
    return text + (f" ± {std:.2f}" if std is not None and text != "–" else "")


def _with_std(mean, std) -> str:
    return _fmt(mean, "+.2f") + (f" ± {std:.2f}" if std is not None else "")


def summary_table(summary: dict[str, dict], n_eval: int, with_controls: bool = False) -> Table:
    table = Table(title=f"Per method (Δ in points of accuracy on {n_eval:,} images; success rate: per student the share of teachers with Δ > 0, median over students)")
    columns = ["method", "pairs", "success rate", f"success, p < {ALPHA}", "mean Δ", "mean Δ, weaker teacher", "mean Δ, stronger teacher", "mean gain", "mean loss"]
    if with_controls:
        columns += ["beats ce", "beats self"]
    columns += ["median capture"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for method, s in summary.items():
        cells = [
            method, str(s["pairs"]), f"{_fmt(s['success_rate'], '.0f')}% ({s['positive']}/{s['pairs']} Δ > 0)",
            f"{_fmt(s['success_rate_significant'], '.0f')}% ({s['significant_positive']}, chance ≈ {s['expected_by_chance'] / 2:.1f})",
            _with_std(s["mean_delta"], s.get("mean_delta_std_over_seeds")),
            f"{_fmt(s['mean_delta_weaker_teacher'], '+.2f')} ({s['weaker_negative']}/{s['weaker_pairs']} < 0)", _fmt(s["mean_delta_stronger_teacher"], "+.2f"),
            _fmt(s["mean_knowledge_gain"]), _fmt(s["mean_knowledge_loss"]),
        ]
        if with_controls:
            for name in ("control", "self"):
                compared = s[f"compared_with_{name}"]
                cells.append(f"{s[f'beats_{name}']}/{compared} ({s[f'beats_{name}_significantly']}*), {_fmt(s[f'mean_delta_vs_{name}'], '+.2f')}" if compared else "–")
        cells.append(f"{_fmt(s.get('median_capture'), '.0%')} ({s.get('capture_pairs', 0)} pairs)")
        table.add_row(*cells)
    table.caption = (
        f"success, p < {ALPHA}: counting only Δ > 0 with McNemar p < {ALPHA} (in brackets the number of such pairs, and how many one-sided chance "
        f"alone gives); beats ce / self: pairs above the control (* with p < {ALPHA}), then the mean difference; "
        f"median capture: over the pairs whose ensemble beats the student, the median of mean Δ ÷ ensemble Δ"
    )
    return table


def head_to_head_table(result: dict) -> Table:
    """Each pair's difference of Δ between two methods (``ktransfer.study.compare_methods``)."""
    method, reference = result["method"], result["reference"]
    table = Table(title=f"{method} against {reference}: {result['pairs']} pairs, {result['runs']} runs (Δ difference, points; mean over seeds)")
    # The transfers table's order and names: teacher, then student, without the zoo: prefix.
    for column in ("teacher", "student", "seeds", f"{method} − {reference}"):
        table.add_column(column, justify="left" if column in ("teacher", "student") else "right", no_wrap=column in ("teacher", "student"))
    for pair in result["by_pair"]:
        table.add_row(str(pair["teacher"]).removeprefix("zoo:"), str(pair["student"]).removeprefix("zoo:"), str(pair["seeds"]), f"{pair['difference']:+.2f}")
    return table


def head_to_head_line(result: dict) -> str:
    """Two methods head to head in a sentence: the sign test over pairs, then McNemar over images."""
    method, reference = result["method"], result["reference"]
    return (
        f"{method} is ahead of {reference} in {result['ahead']} of {result['pairs']} pairs, behind in {result['behind']} "
        f"(sign test p {result['sign_test_p']:.2g}), by {result['mean_difference']:+.2f} points on average; "
        f"{result['only_method']:,} images are right only after {method} and {result['only_reference']:,} only after {reference} "
        f"(McNemar p {result['mcnemar_p']:.2g}, optimistic: each image counts once per pair and seed)"
    )
