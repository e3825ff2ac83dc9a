"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG, no script, no external link."""

from __future__ import annotations

import base64
import html
import statistics
import time

from .._version import __version__
from ..results import ALPHA, summarize, summarize_controls
from .data import ReportData, ceiling_points, is_number, multi_teacher_rows, per_student, short, success_summary

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
img { max-width: 100%; height: auto; display: block; margin: .8em 0; }
.note { color: #555; font-size: .9em; } .positive { color: #1a7f37; } .negative { color: #b42318; }
nav ul { columns: 2; }
"""


def _fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if is_number(value) else "–"


def _signed(value) -> str:
    if not is_number(value):
        return "–"
    shown = round(value, 2)  # the colour follows the number as printed
    css = "positive" if shown > 0 else "negative" if shown < 0 else ""
    return f'<span class="{css}">{value:+.2f}</span>'


def table(caption: str, headers: list[str], rows: list[list[str]], text_columns: int = 1, table_id: str | None = None) -> str:
    """An HTML table; cells are given as HTML already escaped, the first ``text_columns`` left-aligned."""
    head = "".join(f'<th class="{"text" if i < text_columns else ""}">{html.escape(h)}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i < text_columns else ""}">{cell}</td>' for i, cell in enumerate(row)) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><caption>{html.escape(caption)}</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def success_table(data: ReportData) -> str:
    rows = [
        [html.escape(r["method"]), str(r["students"]), _fmt(r["median"], ".1f"), _fmt(r["mean"], ".1f"), f"{_fmt(r['min'], '.0f')}–{_fmt(r['max'], '.0f')}",
         f"{r['positive']}/{r['pairs']}", _signed(r["mean_delta"]), str(r["runs"]), r["n_eval"]]
        for r in success_summary(data)
    ]
    return table(
        "Success rate per method: share of a student's teachers with Δ > 0 (seeds averaged per pair)",
        ["method", "students", "median success %", "mean success %", "range %", "pairs with Δ > 0", "mean Δ", "runs", "n_eval"], rows, table_id="success-table",
    )


def significance_table(data: ReportData) -> str:
    """Per method: significance of the Δs and how the transfers compare with the controls of the same setting."""
    rows = []
    for method, m in summarize(data.records).items():
        versus = [
            f"{m[f'beats_{name}']}/{m[f'compared_with_{name}']} ({m[f'beats_{name}_significantly']}), {_signed(m[f'mean_delta_vs_{name}'])}" if m[f"compared_with_{name}"] else "–"
            for name in ("control", "self")
        ]
        rows.append([
            html.escape(method), str(m["pairs"]), _fmt(m["success_rate_significant"], ".1f"), str(m["significant_positive"]), str(m["significant_negative"]),
            _fmt(m["expected_by_chance"], ".1f"), str(m["fdr_discoveries"]), *versus,
        ])
    return table(
        f"Significance (exact McNemar test on the evaluation images, p < {ALPHA}) and the controls: 'beats ce/self' counts runs whose accuracy is above the "
        f"control's of the same student and setting (in brackets with p < {ALPHA}), then the mean difference",
        ["method", "runs", "median success % (p < 0.05)", "Δ > 0, p < 0.05", "Δ < 0, p < 0.05", "expected by chance", "BH discoveries (FDR 5%)", "beats ce", "beats self"],
        rows, table_id="significance-table",
    )


def ceiling_table(data: ReportData) -> str:
    """Per method: the pairs' ceiling (ensemble Δ) and how much of it the transfers captured."""
    rows = []
    points = ceiling_points(data.records)
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        captures = sorted(p["capture"] for p in mine if p["capture"] is not None)
        rows.append([
            html.escape(method), str(len(mine)), _signed(statistics.fmean(p["ensemble_delta"] for p in mine)), f"{len(captures)}",
            _fmt(100 * statistics.median(captures), ".0f") if captures else "–",
            f"{_fmt(100 * captures[0], '.0f')} to {_fmt(100 * captures[-1], '.0f')}" if captures else "–",
            _signed(statistics.fmean(p["delta"] for p in mine)),
        ])
    return table(
        "The ceiling: ensemble Δ is the accuracy of the mean of student and teacher probabilities minus the student's; capture is a pair's Δ ÷ its ensemble Δ "
        "(defined where ensemble Δ > 0; seeds averaged per pair)",
        ["method", "pairs", "mean ensemble Δ", "pairs with ensemble Δ > 0", "median capture %", "capture range %", "mean Δ"], rows, table_id="ceiling-table",
    )


def controls_table(data: ReportData) -> str:
    rows = [
        [html.escape(kind), str(c["students"]), str(c["runs"]), _signed(c["mean_delta"]), _signed(c["min_delta"]), _signed(c["max_delta"]),
         str(c["significant_positive"]), str(c["significant_negative"]), html.escape(", ".join(f"{short(k)} {v:+.2f}" for k, v in c["by_student"].items()))]
        for kind, c in summarize_controls(data.controls).items()
    ]
    return table(
        "Controls without a teacher: ce fine-tunes on the labels, self is KL+DP toward the original student only. A transfer's gain counts beyond these.",
        ["control", "students", "runs", "mean Δ", "min Δ", "max Δ", "Δ > 0, p < 0.05", "Δ < 0, p < 0.05", "Δ by student"], rows, text_columns=1, table_id="controls-table",
    )


def student_table(data: ReportData) -> str:
    headers = ["student", "accuracy before %"]
    for method in data.methods:
        headers += [f"{method}: Δ", f"{method}: Δρ_pos", f"{method}: Δρ_neg", f"{method}: Δ > 0"]
    headers.append("n_eval")
    rows = []
    for row in per_student(data):
        cells = [html.escape(short(row["student"])), _fmt(row["acc_before"])]
        for method in data.methods:
            m = row["methods"][method]
            if not m["runs"]:
                cells += ["–"] * 4
                continue
            cells += [f"{_signed(m['delta'][0])} ± {_fmt(m['delta'][1])}", f"{_fmt(m['delta_pos_flips'][0], '+.2f')} ± {_fmt(m['delta_pos_flips'][1])}",
                      f"{_fmt(m['delta_neg_flips'][0], '+.2f')} ± {_fmt(m['delta_neg_flips'][1])}", f"{m['positive']}/{m['runs']}"]
        cells.append(row["n_eval"])
        rows.append(cells)
    return table(
        "Per student: mean ± std over teachers and seeds, in points (paper Tables 7, 8). Δρ_pos < 0: the teacher's complementary knowledge was absorbed; Δρ_neg ≈ 0: the student kept its own.",
        headers, rows, table_id="student-table",
    )


def zoo_table(data: ReportData) -> str:
    rows = [
        [html.escape(short(r.get("name", "?"))), html.escape(str(r.get("family", ""))), f"{r['parameters']:,}" if is_number(r.get("parameters")) else "–", _fmt(r.get("accuracy"))]
        for r in data.zoo
    ]
    n = f"{data.analysis.n_eval:,}" if data.analysis else data.n_eval
    return table(f"Models (accuracy on {n} evaluation images)", ["model", "family", "parameters", "accuracy %"], rows, text_columns=2, table_id="zoo-table")


def concentration_table(data: ReportData) -> str:
    analysis = data.analysis
    views = sorted(analysis.pair_views(), key=lambda v: (short(v["student"]), short(v["teacher"])))
    percents = list(analysis.percents)
    rows = [
        [html.escape(short(v["student"])), html.escape(short(v["teacher"])), _fmt(v["positive_flips"]), str(v["flip_count"]), _fmt(v["entropy"], ".3f"), _fmt(v["uniform_entropy"], ".3f")]
        + [html.escape(", ".join(v["top_classes"][float(p)]) or "–") for p in percents]
        + [f"{analysis.n_eval:,}"]
        for v in views
    ]
    headers = ["student", "teacher", "ρ_pos %", "flips", "entropy", "uniform (ln C)"] + [f"top-{p:g}% classes" for p in percents] + ["n_eval"]
    return table(
        "Per pair: how the positive flips spread over classes; the top-X% classes are the fewest classes holding X% of the flips",
        headers, rows, text_columns=2, table_id="class-table",
    )


def multi_teacher_table(data: ReportData) -> str:
    rows = [
        [html.escape(r["strategy"]), html.escape(r["method"]), html.escape(r["student"]), html.escape(r["teachers"]), str(r["stages"] or "–"),
         _fmt(r["acc_before"]), _fmt(r["acc_after"]), _signed(r["delta"]), _fmt(r["knowledge_gain"]), _fmt(r["knowledge_loss"]),
         _signed(r["single_mean_delta"]), _signed(r["single_best_delta"]), f"{int(r['n_eval']):,}" if is_number(r["n_eval"]) else "–"]
        for r in multi_teacher_rows(data.multi_teacher, data.records)
    ]
    return table(
        "Several teachers per student (metrics against the student before the first teacher), beside the single-teacher runs of the same student and method from those teachers",
        ["strategy", "method", "student", "teachers", "stages", "accuracy before %", "accuracy after %", "Δ", "gain", "loss", "single-teacher mean Δ", "single-teacher best Δ", "n_eval"],
        rows, text_columns=4, table_id="multi-teacher-table",
    )


def search_table(data: ReportData) -> str:
    rows = []
    for method, settings in data.search.get("methods", {}).items():
        for s in settings:
            rows.append([html.escape(method), html.escape(s.get("label", "")), f"{s.get('done', 0)}/{s.get('runs', 0)}", str(s.get("failed", 0)), _signed(s.get("mean_delta")), "chosen" if s.get("chosen") else ""])
    pairs = ", ".join(f"{short(t)} → {short(s)}" for s, t in data.search.get("pairs", []))
    return table(
        f"Hyperparameter search on {pairs}; Δ measured on a held-out {100 * data.search.get('holdout', 0):.0f}% of the transfer data, never the evaluation set",
        ["method", "setting", "runs done", "failed", "mean held-out Δ", ""], rows, text_columns=2, table_id="search-table",
    )


def failed_table(data: ReportData) -> str:
    rows = [[html.escape(f["phase"]), html.escape(f["method"]), html.escape(f"{short(f['teacher'])} → {short(f['student'])}"), str(f["seed"]), html.escape(f["error"] or "")] for f in data.failed]
    return table("Failed runs (recorded by the study; rerun with --retry-failed)", ["phase", "method", "teacher → student", "seed", "error"], rows, text_columns=5, table_id="failed-table")


def _spearman_text(r: dict) -> str:
    return f"{_fmt(r.get('spearman'), '+.2f')} [{_fmt(r.get('low'), '+.2f')}, {_fmt(r.get('high'), '+.2f')}] (95% bootstrap), permutation p {_fmt(r.get('p_value'), '.3g')}"


def scout_table(data: ReportData) -> str:
    """Predicted against realised Δ per pair, from the scout.json that 'ktransfer scout --fit' leaves in a study folder."""
    scout = data.scout or {}
    evaluation = scout.get("evaluation") or {}
    key = "predicted_lomo" if evaluation.get("lomo") else "predicted_loso"
    pairs = sorted(scout.get("pairs") or [], key=lambda r: -(r.get(key) or 0))
    rows = [
        [html.escape(f"{short(r.get('teacher'))} → {short(r.get('student'))}"), _signed(r.get("predicted_lomo")), _signed(r.get("predicted_loso")), _signed(r.get("predicted")),
         f"[{_fmt(r.get('low'), '+.2f')}, {_fmt(r.get('high'), '+.2f')}]", _signed(r.get("delta")), _fmt(r.get("noise")), _signed(r.get("test_delta"))]
        for r in pairs
    ]
    lomo = evaluation.get("lomo")
    lomo_text = f"leave-one-model-out Spearman {_spearman_text(lomo)}" if lomo else f"leave-one-model-out Spearman not computed ({html.escape(str(evaluation.get('lomo_note') or 'a fit older than this split'))})"
    caption = (
        f"Scouting ({html.escape(str(scout.get('method', '?')))}): predicted against realised Δ per pair; {lomo_text}; "
        f"leave-one-student-out Spearman {_spearman_text(evaluation.get('loso') or {})} (optimistic: the held-out student still teaches in training pairs)"
    )
    return table(caption, ["teacher → student", "predicted (model held out)", "predicted (student held out)", "predicted (full fit)", "interval", "realised Δ", "noise of Δ", "scored Δ"], rows, table_id="scout-table")


def render(data: ReportData, figures: dict[str, tuple[str, bytes]]) -> str:
    """The page; ``figures`` maps a figure's name to its title and PNG bytes."""
    sections: list[tuple[str, str, str]] = []  # (anchor, heading, body)

    def add(anchor: str, heading: str, *parts: str) -> None:
        sections.append((anchor, heading, "".join(p for p in parts if p)))

    def fig(name: str) -> str:
        if name not in figures:
            return ""
        title, png = figures[name]
        return image(png, title) + f'<p class="note">Also saved as {html.escape(name)}.png beside this page.</p>'

    if data.records:
        add("success", "Success rate per method", fig("success_rate"), success_table(data), significance_table(data))
    if data.controls:
        add("controls", "Controls", controls_table(data))
    if data.records:
        add("students", "Per student", student_table(data))
        add("gain-loss", "Knowledge gain against knowledge loss", '<p class="note">One marker per run; above the diagonal the student gained more than it lost (Δ > 0).</p>', fig("gain_vs_loss"))
        if "delta_vs_ceiling" in figures:
            add("ceiling", "Δ against the ceiling", '<p class="note">One point per pair (seeds averaged): x the ensemble of student and teacher over the student, y the transfer\'s Δ. On the dashed line y = x a transfer gained all the ensemble gains; on y = 0 none of it.</p>', fig("delta_vs_ceiling"), ceiling_table(data))
        add("gap", "Δ against the accuracy gap", '<p class="note">Points: runs. Lines: per bin of the gap, the mean of the bin\'s best 25% of runs.</p>', fig("delta_vs_gap"))
    if "over_epochs" in figures:
        add("epochs", "Over epochs", '<p class="note">Mean over runs per epoch; the band spans the lowest to the highest run.</p>', fig("over_epochs"))
    if data.analysis is not None:
        add("complementarity", "Complementary knowledge", zoo_table(data) if data.zoo else "", fig("complementarity"))
        if data.analysis.has_per_class:
            add("per-class", "Per-class view", fig("per_class"), concentration_table(data))
    if data.multi_teacher:
        add("multi-teacher", "Several teachers", multi_teacher_table(data))
    if data.search:
        add("search", "Hyperparameter search", search_table(data))
    if data.scout:
        add("scout", "Scouting: predicted against realised Δ", '<p class="note">From scout.json (ktransfer scout --fit, docs/scouting.md). The student-held-out prediction never saw that student\'s pairs; scored Δ: the same pair in the study given to --score-on.</p>', scout_table(data))
    if data.failed:
        add("failed", "Failed runs", failed_table(data))

    runs = len(data.records) + len(data.multi_teacher)
    epochs = sorted({r.get("epochs") for r in data.records if is_number(r.get("epochs"))})
    summary = (
        f"{runs} runs" + (f" and {len(data.controls)} control runs" if data.controls else "") + f"; methods: {html.escape(', '.join(data.methods) or '–')}; {len(data.students)} students; "
        f"epochs: {', '.join(map(str, epochs)) or '–'}; evaluation samples per number (n_eval): {data.n_eval}. "
        "All numbers are percent of the evaluation set; on small sets a few tenths of a point are noise."
    )
    nav = "".join(f'<li><a href="#{anchor}">{html.escape(heading)}</a></li>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{content}</section>' for anchor, heading, content in sections)
    generated = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>ktransfer report: {html.escape(data.title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>ktransfer report: {html.escape(data.title)}</h1><p>{summary}</p>"
        f"<nav><ul>{nav}</ul></nav>{body}"
        f'<p class="note">Made by ktransfer {__version__} on {generated}.</p></body></html>\n'
    )
