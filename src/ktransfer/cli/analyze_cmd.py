from __future__ import annotations

from pathlib import Path

import click

from .group import main
from .options import data_dir_option, split_list


@main.command("analyze")
@click.option("--models", default=None, help="Comma-separated model specs (default: the whole zoo, zoo:mlp,zoo:cnn,...). Each runs once over the evaluation set.")
@click.option("--pair", default=None, metavar="STUDENT,TEACHER", help="Show the per-class view of one pair in full (default: a one-line summary of every pair).")
@click.option("--data", "data_spec", default="fashion-mnist", show_default=True, help="Dataset whose evaluation split is analysed.")
@click.option("--transfer-data", "transfer_spec", default=None, metavar="SPEC|none", help="Transfer data to diagnose against the evaluation data (default: the transfer split of --data; for fashion-mnist the demo's transfer set). A spec as for 'ktransfer transfer --transfer-data', or none to skip the diagnostics.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write the analysis as JSON (the format `ktransfer report` reads as complementarity.json).")
@data_dir_option
def analyze_command(models, pair, data_spec, transfer_spec, out, data_dir):
    """Measure the complementary knowledge among N models on the evaluation set.

    Prints the N×N matrices of positive flips (the student, a row, is wrong and the teacher, a
    column, right) and negative flips, then per pair how the positive flips spread over classes:
    their entropy against the uniform one (ln C) and the smallest sets of classes holding 2, 5,
    20 and 50% of them. The ceiling of each pair: the Δ of the two models' ensemble over the
    student, and the oracle's accuracy (either model right).

    Then diagnostics of the transfer data against the evaluation data: each model's mean
    probability of the true class and entropy, ρ_pos, and how much of what KL+DP routes to the
    teacher corrects the student (see docs/analyze.md).

    Example: ktransfer analyze --models zoo:cnn,zoo:mlp,zoo:vit --pair zoo:cnn,zoo:mlp
    """
    from ..output import output_console

    from ..analysis import analyze, diagnose_transfer_set
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
    transfer_data = _transfer_data(transfer_spec, data, list(loaded.values()), data_dir)
    analysis = analyze(loaded, data.eval)
    if chosen_pair is not None:
        analysis.pair_view(*chosen_pair)  # unknown names fail before anything is printed
    diagnostics = diagnose_transfer_set(loaded, transfer_data, data.eval) if transfer_data is not None else None

    console = output_console()
    short = [name.removeprefix("zoo:") for name in analysis.models]
    console.print(tables.flip_matrix_table(short, analysis.positive_flips, analysis.n_eval))
    console.print(tables.flip_matrix_table(
        short, analysis.negative_flips, analysis.n_eval,
        title=f"ρ_neg %: samples the student (row) gets right and the teacher (column) wrong; n={analysis.n_eval:,}",
    ))
    console.print(tables.flip_matrix_table(
        short, analysis.ensemble_delta, analysis.n_eval, number_format="+.2f",
        title=f"Ceiling: ensemble Δ, points: accuracy of the mean of the two models' probabilities minus the student's (row); n={analysis.n_eval:,}",
    ))
    console.print(tables.flip_matrix_table(
        short, analysis.oracle, analysis.n_eval,
        title=f"Oracle %: samples the student (row) or the teacher (column) gets right; n={analysis.n_eval:,}",
    ))
    if chosen_pair is not None:
        console.print(pair_table(analysis.pair_view(*chosen_pair)))
    else:
        console.print(pairs_concentration_table(analysis.pair_views(), analysis.n_eval))
    if diagnostics is not None:
        console.print(diagnostics_model_table(diagnostics))
        console.print(diagnostics_pair_table(diagnostics))
    if out is not None:
        analysis.save(out)
        if diagnostics is not None:  # beside the analysis, in the same file; readers of the analysis ignore it
            import json

            payload = json.loads(out.read_text())
            payload["transfer_set_diagnostics"] = diagnostics.to_dict()
            out.write_text(json.dumps(payload, indent=1))
        console.print(f"analysis written to [bold]{out}[/]")


def _transfer_data(spec, data, models, data_dir):
    """The transfer data to diagnose: --transfer-data, else the transfer split of --data; None for 'none'."""
    if spec is not None and spec.lower() == "none":
        return None
    if spec is None:
        return data.transfer
    from ..data.sources import materialize, open_split, raw_channels, raw_image_size
    from ..errors import ConfigError

    source = open_split(spec, "transfer", list(data.eval.class_names), data_dir)
    if list(source.class_names) != list(data.eval.class_names):
        raise ConfigError(f"--transfer-data {spec} has other classes than the evaluation data {data.eval.name}; diagnose transfer data of the same label space")
    preprocesses = [model.preprocess for model in models]
    return materialize(source, raw_image_size(preprocesses), raw_channels(preprocesses))


def diagnostics_model_table(d):
    from rich.table import Table

    table = Table(title=(
        f"What the transfer set can carry, per model: on {d.transfer_data} (n={d.n_transfer:,}) against held-out {d.held_out_data} (n={d.n_held_out:,}). "
        f"p(true): mean probability of the true class, %; entropy: mean entropy of the outputs, nats (ln C = uniform)"
    ))
    for column in ("model", "acc transfer", "acc held-out", "p(true) transfer", "p(true) held-out", "entropy transfer", "entropy held-out"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in d.models:
        m = d.per_model[name]
        table.add_row(
            name.removeprefix("zoo:"), f"{m['transfer_acc']:.2f}", f"{m['held_out_acc']:.2f}", f"{m['transfer_true_class_probability']:.1f}",
            f"{m['held_out_true_class_probability']:.1f}", f"{m['transfer_entropy']:.3f}", f"{m['held_out_entropy']:.3f}",
        )
    table.caption = "p(true) near 100 and entropy near 0 on the transfer set: near one-hot targets, little beyond the labels"
    return table


def diagnostics_pair_table(d):
    from rich.table import Table

    names = list(d.models)
    table = Table(title=(
        f"Per pair on the transfer set: ρ_pos (student wrong, teacher right) there and held out, and KL+DP's routing there: "
        f"to teacher = share of samples whose true-class probability is higher under the teacher (ties: the student); "
        f"useful = share of those where the teacher is right and the original student wrong"
    ))
    for column in ("student", "teacher", "ρ_pos % transfer", "ρ_pos % held-out", "to teacher %", "useful % of routed", "useful samples"):
        table.add_column(column, justify="left" if column in ("student", "teacher") else "right")
    for r in d.routing:
        i, j = names.index(r["student"]), names.index(r["teacher"])
        useful = r["routed_useful"]
        table.add_row(
            r["student"].removeprefix("zoo:"), r["teacher"].removeprefix("zoo:"), f"{d.positive_flips_transfer[i, j]:.2f}", f"{d.positive_flips_held_out[i, j]:.2f}",
            f"{r['routed']:.1f}", "–" if useful != useful else f"{useful:.1f}", f"{r['routed_useful_count']:,} of {r['routed_count']:,}",
        )
    return table


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
