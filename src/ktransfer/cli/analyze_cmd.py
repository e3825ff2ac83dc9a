from __future__ import annotations

from pathlib import Path

import click

from . import main
from .options import data_dir_option, split_list


@main.command("analyze")
@click.option("--models", default=None, help="Comma-separated model specs (default: the whole zoo, zoo:mlp,zoo:cnn,...). Each runs once over the evaluation set.")
@click.option("--pair", default=None, metavar="STUDENT,TEACHER", help="Show the per-class view of one pair in full (default: a one-line summary of every pair).")
@click.option("--data", "data_spec", default="fashion-mnist", show_default=True, help="Dataset whose evaluation split is analysed.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the analysis as JSON (the format `ktransfer report` reads as complementarity.json).")
@data_dir_option
def analyze_command(models, pair, data_spec, out, data_dir):
    """Measure the complementary knowledge among N models on the evaluation set.

    Prints the N×N matrices of positive flips (the student, a row, is wrong and the teacher, a
    column, right) and negative flips, then per pair how the positive flips spread over classes:
    their entropy against the uniform one (ln C) and the smallest sets of classes holding 2, 5,
    20 and 50% of them.

    Example: ktransfer analyze --models zoo:cnn,zoo:mlp,zoo:vit --pair zoo:cnn,zoo:mlp
    """
    from rich.console import Console

    from ..analysis import analyze
    from ..errors import ConfigError
    from ..models import load_model
    from ..models.store import zoo_names
    from ..study import DataConfig
    from .. import tables

    specs = split_list(models) or [f"zoo:{name}" for name in zoo_names()]
    chosen_pair = split_list(pair)
    if chosen_pair is not None and len(chosen_pair) != 2:
        raise ConfigError(f"--pair takes STUDENT,TEACHER; got {pair!r}")
    data = DataConfig.parse(data_spec, data_dir=data_dir).load()
    loaded = {spec: load_model(spec, data_dir=data_dir) for spec in dict.fromkeys(specs)}
    analysis = analyze(loaded, data.eval)
    if chosen_pair is not None:
        analysis.pair_view(*chosen_pair)  # unknown names fail before anything is printed

    console = Console()
    short = [name.removeprefix("zoo:") for name in analysis.models]
    console.print(tables.flip_matrix_table(short, analysis.positive_flips, analysis.n_eval))
    console.print(tables.flip_matrix_table(
        short, analysis.negative_flips, analysis.n_eval,
        title=f"ρ_neg %: samples the student (row) gets right and the teacher (column) wrong; n={analysis.n_eval:,}",
    ))
    if chosen_pair is not None:
        console.print(pair_table(analysis.pair_view(*chosen_pair)))
    else:
        console.print(pairs_concentration_table(analysis.pair_views(), analysis.n_eval))
    if out is not None:
        analysis.save(out)
        console.print(f"analysis written to [bold]{out}[/]")


def _top(view: dict, percent: float) -> str:
    return ", ".join(view["top_classes"][float(percent)]) or "–"


def pair_table(view: dict):
    from rich.table import Table

    total = max(view["flip_count"], 1)
    table = Table(title=(
        f"Positive flips of {view['teacher']} against {view['student']} per class: {view['flip_count']} of {view['n_eval']:,} samples "
        f"({view['positive_flips']:.2f}%); entropy {view['entropy']:.3f} vs uniform {view['uniform_entropy']:.3f}"
    ))
    table.add_column("class")
    table.add_column("flips", justify="right")
    table.add_column("share %", justify="right")
    for name, count in sorted(zip(_class_names(view), view["counts"]), key=lambda item: -item[1]):
        table.add_row(name, str(count), f"{100 * count / total:.1f}")
    for percent, names in view["top_classes"].items():
        table.caption = (table.caption + "\n" if table.caption else "") + f"top-{percent:g}% classes: {', '.join(names) or '–'}"
    return table


def _class_names(view: dict) -> list[str]:
    return view.get("class_names") or [str(i) for i in range(len(view["counts"]))]


def pairs_concentration_table(views: list[dict], n_eval: int):
    from rich.table import Table

    percents = list(views[0]["top_classes"]) if views else []
    table = Table(title=(
        f"Where the complementary knowledge sits: positive flips per class, every pair (n={n_eval:,}). "
        f"The top-X% classes are the fewest holding X% of the flips; each set starts the next, so the largest is listed"
    ))
    for column in ("student", "teacher", "ρ_pos %", "entropy", "uniform", f"classes for {'/'.join(f'{p:g}' for p in percents)}%", f"top-{percents[-1]:g}% classes" if percents else "classes"):
        table.add_column(column, justify="right" if column in ("ρ_pos %", "entropy", "uniform") else "left")
    for view in views:
        sizes = " / ".join(str(len(view["top_classes"][p])) for p in percents)
        table.add_row(
            view["student"].removeprefix("zoo:"), view["teacher"].removeprefix("zoo:"), f"{view['positive_flips']:.2f}",
            f"{view['entropy']:.3f}", f"{view['uniform_entropy']:.3f}", sizes, _top(view, percents[-1]),
        )
    return table
