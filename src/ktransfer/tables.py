"""Rich tables for the terminal: the zoo, the complementarity matrix, pairs and per-method summaries."""

from __future__ import annotations

from rich.table import Table


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


def flip_matrix_table(names: list[str], matrix, n_eval: int, title: str | None = None) -> Table:
    table = Table(title=title or f"Complementary knowledge ρ_pos %: samples the student (row) gets wrong and the teacher (column) right; n={n_eval:,}")
    table.add_column("student \\ teacher", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for i, row_name in enumerate(names):
        table.add_row(row_name, *["·" if i == j else _fmt(matrix[i][j], ".1f") for j in range(len(names))])
    return table


def pairs_table(records: list[dict], n_eval: int) -> Table:
    table = Table(title=f"Transfers (percent of {n_eval:,} evaluation images; share = data routed to the teacher)")
    for column in ("method", "teacher", "student", "teacher acc", "student acc", "Δ", "gain", "loss", "share"):
        # names never wrap or get cut; the numeric columns give way on a narrow terminal
        table.add_column(column, justify="left" if column in ("method", "teacher", "student") else "right", no_wrap=column in ("method", "teacher", "student"))
    for r in records:
        share = r.get("teacher_share")
        table.add_row(
            r["method"], str(r["teacher"]).removeprefix("zoo:"), str(r["student"]).removeprefix("zoo:"),
            _fmt(r["teacher_acc"]), _fmt(r["acc_before"]), _fmt(r["delta"], "+.2f"), _fmt(r["knowledge_gain"]), _fmt(r["knowledge_loss"]),
            _fmt(share, ".0%") if share is not None else "–",
        )
    return table


def summary_table(summary: dict[str, dict], n_eval: int) -> Table:
    table = Table(title=f"Per method (Δ in points of accuracy on {n_eval:,} images)")
    for column in ("method", "pairs", "success rate", "mean Δ", "mean Δ, weaker teacher", "mean Δ, stronger teacher", "mean gain", "mean loss"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for method, s in summary.items():
        table.add_row(
            method, str(s["pairs"]), f"{_fmt(s['success_rate'], '.1f')}% ({s['positive']}/{s['pairs']})", _fmt(s["mean_delta"], "+.2f"),
            f"{_fmt(s['mean_delta_weaker_teacher'], '+.2f')} ({s['weaker_negative']}/{s['weaker_pairs']} < 0)", _fmt(s["mean_delta_stronger_teacher"], "+.2f"),
            _fmt(s["mean_knowledge_gain"]), _fmt(s["mean_knowledge_loss"]),
        )
    return table
