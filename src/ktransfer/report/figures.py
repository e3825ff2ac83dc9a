"""The report's figures (matplotlib, no pyplot: no global state, no display needed).

Each function takes :class:`ReportData` and returns a ``Figure``, or ``None`` where the folder
lacks what the figure needs.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import numpy as np

from ..extras import require
from .data import ReportData, ceiling_points, histories, is_number, short, success_rates


def _figure(width: float, height: float):
    require("matplotlib", "report", "drawing the report's figures")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure


def _colours(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def success_rate_boxplot(data: ReportData):
    """Fig. 4a: per method, the distribution over students of their success rate."""
    rates = success_rates(data.records)
    methods = [m for m in data.methods if rates.get(m)]
    if not methods:
        return None
    figure = _figure(max(4.0, 1.4 * len(methods) + 2), 4.0)
    axes = figure.add_subplot()
    values = [list(rates[m].values()) for m in methods]
    axes.boxplot(values, showmeans=True, meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
    axes.set_xticks(range(1, len(methods) + 1), methods)  # (boxplot's own label argument was renamed in matplotlib 3.9)
    colours = _colours(data.students)
    jitter = np.random.default_rng(0)
    for i, method in enumerate(methods, 1):
        students = list(rates[method])
        xs = i + jitter.uniform(-0.12, 0.12, len(students))
        axes.scatter(xs, [rates[method][s] for s in students], c=[colours[s] for s in students], s=22, zorder=3, edgecolors="black", linewidths=0.4)
    axes.set_ylabel("success rate per student (% of teachers with Δ > 0)")
    axes.set_ylim(-5, 105)
    axes.set_title(f"Success rate over {len(data.students)} students\n(n_eval {data.n_eval} per run)", fontsize=10)
    axes.grid(axis="y", alpha=0.3)
    return figure


def gain_vs_loss(data: ReportData):
    """Fig. 7: knowledge gain against knowledge loss, one marker per pair, coloured by student, the diagonal drawn."""
    methods = data.methods
    if not methods:
        return None
    columns = min(len(methods), 3)
    rows = math.ceil(len(methods) / columns)
    figure = _figure(4.2 * columns + 1.6, 3.8 * rows)
    colours = _colours(data.students)
    top = max(max(r["knowledge_gain"], r["knowledge_loss"]) for r in data.records) * 1.08 or 1.0
    for index, method in enumerate(methods):
        axes = figure.add_subplot(rows, columns, index + 1)
        runs = [r for r in data.records if r["method"] == method]
        for student in data.students:
            mine = [r for r in runs if r["student"] == student]
            if mine:
                axes.scatter([r["knowledge_loss"] for r in mine], [r["knowledge_gain"] for r in mine], color=colours[student], label=short(student), s=26, edgecolors="black", linewidths=0.3)
        axes.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
        axes.set_xlim(0, top)
        axes.set_ylim(0, top)
        axes.set_aspect("equal")
        axes.set_xlabel("knowledge loss (%)")
        axes.set_ylabel("knowledge gain (%)")
        above = sum(1 for r in runs if r["knowledge_gain"] > r["knowledge_loss"])
        axes.set_title(f"{method}: {above}/{len(runs)} above the diagonal")
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, title="student", loc="outside right center")
    return figure


def gap_bins(gaps: list[float], deltas: list[float], bins: int) -> list[dict]:
    """Equal-width bins of the accuracy gap; per bin the mean of its top 25% Δ (at least one run)."""
    gaps_array, deltas_array = np.asarray(gaps, dtype=float), np.asarray(deltas, dtype=float)
    edges = np.histogram_bin_edges(gaps_array, bins=bins)
    which = np.clip(np.digitize(gaps_array, edges[1:-1], right=False), 0, len(edges) - 2)
    out = []
    for b in range(len(edges) - 1):
        inside = np.sort(deltas_array[which == b])[::-1]
        if len(inside) == 0:
            continue
        top = inside[: max(1, math.ceil(0.25 * len(inside)))]
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "centre": float((edges[b] + edges[b + 1]) / 2), "count": int(len(inside)), "top25_mean": float(top.mean())})
    return out


def delta_vs_gap(data: ReportData):
    """Fig. 9: Δ against the teacher-minus-student accuracy gap, in bins, with the mean of each bin's top 25%."""
    runs = [r for r in data.records if is_number(r.get("teacher_acc")) and is_number(r.get("acc_before"))]
    if not runs:
        return None
    figure = _figure(7.0, 4.2)
    axes = figure.add_subplot()
    colours = _colours(data.methods)
    for method in data.methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        gaps = [r["teacher_acc"] - r["acc_before"] for r in mine]
        deltas = [r["delta"] for r in mine]
        axes.scatter(gaps, deltas, color=colours[method], alpha=0.35, s=16)
        binned = gap_bins(gaps, deltas, bins=max(1, min(6, len(mine) // 4)))
        axes.plot([b["centre"] for b in binned], [b["top25_mean"] for b in binned], color=colours[method], marker="o", linewidth=2, label=f"{method}: mean of top 25% per bin")
    axes.axhline(0, color="grey", linewidth=1)
    axes.axvline(0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("teacher accuracy − student accuracy (points)")
    axes.set_ylabel("Δ transfer (points)")
    axes.set_title(f"Transfer delta against the accuracy gap (n_eval {data.n_eval})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def over_epochs(data: ReportData):
    """Fig. 11: Δ, gain and loss over epochs, mean over the runs of each method or strategy (band: min to max)."""
    runs = histories([*data.records, *data.multi_teacher])
    if not any(len(history) > 1 for _, history in runs):  # none, or scored after the last epoch only (eval_every 0)
        return None
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[list[dict]]] = defaultdict(list)
    for group, history in runs:
        groups[group].append(history)
    colours = _colours(list(groups))
    figure = _figure(12.0, 3.6)
    panels = [("delta", "Δ transfer"), ("knowledge_gain", "knowledge gain"), ("knowledge_loss", "knowledge loss")]
    for index, (key, label) in enumerate(panels):
        axes = figure.add_subplot(1, 3, index + 1)
        for group, group_histories in groups.items():
            by_epoch: dict[int, list[float]] = defaultdict(list)
            for history in group_histories:
                for entry in history:
                    if is_number(entry.get(key)):
                        by_epoch[int(entry["epoch"])].append(entry[key])
            epochs = sorted(by_epoch)
            if not epochs:
                continue
            means = [statistics.fmean(by_epoch[e]) for e in epochs]
            axes.plot(epochs, means, marker="o", color=colours[group], label=f"{group} ({len(group_histories)} runs)")
            axes.fill_between(epochs, [min(by_epoch[e]) for e in epochs], [max(by_epoch[e]) for e in epochs], color=colours[group], alpha=0.15)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(f"{label} (%)")
        axes.set_title(label)
        axes.grid(alpha=0.3)
        if key == "delta":
            axes.axhline(0, color="grey", linewidth=1)
            axes.legend(fontsize=8)
    return figure


def complementarity_heatmap(data: ReportData):
    """The N×N matrices of positive and negative flips (row: student, column: teacher)."""
    analysis = data.analysis
    if analysis is None:
        return None
    names = [short(m) for m in analysis.models]
    size = max(4.0, 0.55 * len(names) + 2.5)
    figure = _figure(2 * size + 1, size)
    for index, (matrix, title, cmap) in enumerate(((analysis.positive_flips, "ρ_pos: student wrong, teacher right", "Greens"), (analysis.negative_flips, "ρ_neg: student right, teacher wrong", "Reds"))):
        axes = figure.add_subplot(1, 2, index + 1)
        shown = np.array(matrix, dtype=float)
        np.fill_diagonal(shown, np.nan)
        image = axes.imshow(shown, cmap=cmap)
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axes.set_yticks(range(len(names)), names)
        axes.set_xlabel("teacher")
        axes.set_ylabel("student")
        axes.set_title(f"{title} (% of {analysis.n_eval:,})", fontsize=10)
        if len(names) <= 12:
            finite = shown[np.isfinite(shown)]
            middle = (finite.min() + finite.max()) / 2 if finite.size else 0
            for i in range(len(names)):
                for j in range(len(names)):
                    if i != j:
                        axes.text(j, i, f"{shown[i, j]:.1f}", ha="center", va="center", fontsize=8, color="white" if shown[i, j] > middle else "black")
        figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


MAX_PAIRS_SHOWN = 40


def per_class_views(data: ReportData):
    """Where the positive flips sit: each pair's share per class, and the entropy of that histogram against ln C."""
    analysis = data.analysis
    if analysis is None or not analysis.has_per_class:
        return None
    views = sorted(analysis.pair_views(), key=lambda v: -v["flip_count"])[:MAX_PAIRS_SHOWN]
    views = [v for v in views if v["flip_count"] > 0]
    if not views:
        return None
    classes = analysis.class_names
    shares = np.array([np.asarray(v["counts"], dtype=float) / v["flip_count"] for v in views]) * 100
    labels = [f"{short(v['teacher'])} → {short(v['student'])}" for v in views]
    height = max(4.0, 0.22 * len(views) + 2)
    figure = _figure(13.0, height)
    grid = figure.add_gridspec(1, 2, width_ratios=[1.6, 1])
    axes = figure.add_subplot(grid[0, 0])
    image = axes.imshow(shares, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.set_title(f"share of each pair's positive flips per class (%), n_eval {analysis.n_eval:,}", fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes = figure.add_subplot(grid[0, 1])
    entropies = [v["entropy"] for v in views]
    axes.barh(range(len(views)), entropies, color="tab:blue")
    axes.axvline(views[0]["uniform_entropy"], color="black", linestyle="--", label=f"uniform: ln {len(classes)} = {views[0]['uniform_entropy']:.2f}")
    axes.set_yticks(range(len(labels)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlabel("entropy of the per-class histogram (nats)")
    axes.set_title("concentration: entropy below uniform", fontsize=10)
    axes.legend(fontsize=8, loc="lower right")
    return figure


def delta_vs_ceiling(data: ReportData):
    """Δ against the pair's ensemble Δ, one point per pair (seeds averaged), per method colour: y = x is full capture, y = 0 none."""
    points = ceiling_points(data.records)
    if not points:
        return None
    figure = _figure(6.4, 5.0)
    axes = figure.add_subplot()
    methods = list(dict.fromkeys(p["method"] for p in points))
    colours = _colours(methods)
    for method in methods:
        mine = [p for p in points if p["method"] == method]
        captures = [p["capture"] for p in mine if p["capture"] is not None]
        label = f"{method}: median capture {100 * statistics.median(captures):.0f}% ({len(captures)} pairs)" if captures else f"{method}: no pair with ensemble Δ > 0"
        axes.scatter([p["ensemble_delta"] for p in mine], [p["delta"] for p in mine], color=colours[method], s=26, edgecolors="black", linewidths=0.3, label=label, zorder=3)
    xs = [p["ensemble_delta"] for p in points]
    low, high = min(0.0, *xs), max(0.0, *xs)
    span = (high - low) or 1.0
    line = [low - 0.05 * span, high + 0.05 * span]
    axes.plot(line, line, color="grey", linestyle="--", linewidth=1, label="y = x: the whole ensemble gain captured")
    axes.axhline(0, color="grey", linewidth=1)
    axes.axvline(0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("ensemble Δ: ensemble of student and teacher over the student (points)")
    axes.set_ylabel("Δ transfer (points)")
    axes.set_title(f"Transfer Δ against the pair's ceiling (n_eval {data.n_eval})", fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure


FIGURES = {
    "success_rate": (success_rate_boxplot, "Success rate per method (paper Fig. 4a)"),
    "gain_vs_loss": (gain_vs_loss, "Knowledge gain against knowledge loss (paper Fig. 7)"),
    "delta_vs_gap": (delta_vs_gap, "Δ against the teacher-student accuracy gap (paper Fig. 9)"),
    "delta_vs_ceiling": (delta_vs_ceiling, "Δ against the ensemble's Δ, the pair's ceiling"),
    "over_epochs": (over_epochs, "Δ, gain and loss over epochs (paper Fig. 11)"),
    "complementarity": (complementarity_heatmap, "Complementary knowledge between the models"),
    "per_class": (per_class_views, "Per-class view of the complementary knowledge"),
}
