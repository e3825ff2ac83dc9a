from __future__ import annotations

from pathlib import Path

import click

from .group import main
from .options import data_dir_option

SCOUT_DATA_DEFAULT = "fashion-mnist:validation"


@main.command("scout")
@click.option("--student", default=None, help="Student model spec, e.g. zoo:cnn.")
@click.option("--teacher", "teachers", multiple=True, help="A candidate teacher's model spec; repeat for each candidate.")
@click.option("--data", "data_spec", default=SCOUT_DATA_DEFAULT, show_default=True, metavar="SPEC", help="Held-out labelled data the models run over once: fashion-mnist[:validation|transfer|test|pool] or folder:PATH of class subfolders. Not the data you will judge the transfer on.")
@click.option("--size", type=click.IntRange(min=1), default=None, metavar="N", help="Scout on a seeded stratified subset of N samples of the data (faster for large models).")
@click.option("--predictor", type=click.Path(dir_okay=False, path_type=Path), default=None, help="A predictor written by --fit (default: the one shipped with ktransfer, fitted on the embedded zoo).")
@click.option("--fit", "fit_folder", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="STUDY_FOLDER", help="Instead of scouting: fit a predictor on this study's realised Δs and check it leave-one-model-out (and leave-one-student-out).")
@click.option("--method", default="kl_dp", show_default=True, help="--fit: the study's method whose Δ the predictor learns.")
@click.option("--features", default=None, metavar="A,B,...", help="--fit: the statistics the predictor uses (default: positive_flips,teacher_share,accuracy_gap,flip_spread, those of the shipped predictor; ensemble_delta may be added). The file stores them and predictions use its list.")
@click.option("--score-on", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="STUDY_FOLDER", help="--fit: also score the held-out predictions against this study's Δs of the same pairs (e.g. the same study evaluated on the test set).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="--fit: where to write the predictor JSON (default: STUDY_FOLDER/scout-predictor.json). With scouting: also write the ranking as JSON here.")
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:N or mps.")
@data_dir_option
def scout_command(student, teachers, data_spec, size, predictor, fit_folder, method, features, score_on, out, device, data_dir):
    """Rank candidate teachers for a student before training, from one forward pass of each model.

    Per pair it measures the positive-flip rate ρ_pos, the share of samples KL+DP would route to the
    teacher, the accuracy gap and how the flips spread over classes, and predicts the transfer's Δ
    with an interval. It also shows the ensemble Δ (the two models' ensemble over the student: the
    pair's ceiling). A teacher whose interval lies at or below 0 is unlikely to help.

    Example: ktransfer scout --student zoo:cnn --teacher zoo:mlp --teacher zoo:vit --teacher zoo:convnext

    Fit a predictor on a finished study: ktransfer scout --fit scout-fit-study (see docs/scouting.md)
    """
    from ..errors import ConfigError

    if fit_folder is not None:
        if student or teachers or predictor is not None:
            raise ConfigError("--fit fits a predictor from a study; leave out --student, --teacher and --predictor (scout with the fitted file afterwards)")
        _fit(fit_folder, method, score_on, out, device, features)
        return
    if score_on is not None:
        raise ConfigError("--score-on belongs to --fit STUDY_FOLDER")
    if features is not None:
        raise ConfigError("--features belongs to --fit STUDY_FOLDER; a predictor predicts from the features stored in its file")
    if not student or not teachers:
        raise ConfigError("name a --student and at least one --teacher to scout (or --fit STUDY_FOLDER to fit a predictor)")
    _scout(student, list(teachers), data_spec, size, predictor, out, device, data_dir)


def _load_scout_data(spec: str, models, size, data_dir):
    from ..data.base import stratified_split
    from ..data.sources import materialize, open_split, raw_channels, raw_image_size

    source = open_split(spec, "eval", None, data_dir)
    preprocesses = [model.preprocess for model in models]
    data = materialize(source, raw_image_size(preprocesses), raw_channels(preprocesses))
    if size is not None and size < len(data):
        chosen, _ = stratified_split(data.labels, size, 0)
        data = data.subset(chosen, f"{data.name}[{size},seed=0]")
    return data


def _scout(student, teachers, data_spec, size, predictor_path, out, device, data_dir):
    import json

    from ..output import output_console

    from ..engine import check_device
    from ..models import load_model
    from ..scout import ScoutPredictor, scout

    check_device(device)
    predictor = ScoutPredictor.load(predictor_path)  # a bad file fails before any model runs
    models = {spec: load_model(spec, data_dir=data_dir) for spec in dict.fromkeys([student, *teachers])}
    data = _load_scout_data(data_spec, list(models.values()), size, data_dir)
    result = scout(models[student], [models[t] for t in teachers], data, predictor=predictor, device=device)
    console = output_console()
    console.print(ranking_table(result))
    unlikely = result.unlikely
    console.print(f"unlikely to help: {', '.join(unlikely)}" if unlikely else "no teacher is ruled out: every interval reaches above 0")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
        console.print(f"ranking written to [bold]{out}[/]")


def ranking_table(result):
    from rich.table import Table

    from ..scout import FEATURE_LABELS, FEATURES

    setting = result.setting or {}
    fitted = f"; predictor fitted on {setting.get('study', '?')} ({setting.get('evaluated_on', '?')})" if setting else ""
    table = Table(title=(
        f"Teachers for {result.student}: predicted Δ of {result.method} (points) with its {result.coverage:.0%} interval; "
        f"statistics on {result.data}, n={result.n:,}{fitted}"
    ))
    for column in ("teacher", "predicted Δ", "interval", *(FEATURE_LABELS[f] for f in FEATURES), FEATURE_LABELS["ensemble_delta"], "verdict"):
        table.add_column(column, justify="left" if column in ("teacher", "verdict") else "right")
    for t in result.teachers:
        table.add_row(
            t.teacher, f"{t.predicted:+.2f}", f"[{t.low:+.2f}, {t.high:+.2f}]", f"{t.stats.positive_flips:.2f}", f"{t.stats.teacher_share:.1f}",
            f"{t.stats.accuracy_gap:+.2f}", f"{t.stats.flip_spread:.2f}", f"{t.stats.ensemble_delta:+.2f}", t.verdict,
        )
    table.caption = "ensemble Δ: accuracy of the mean of student and teacher probabilities minus the student's, points (the pair's ceiling)"
    return table


def _fit(folder: Path, method: str, score_on, out, device, features=None):
    from ..output import output_console

    from ..engine import check_device
    from ..scout import FEATURES, PREDICTOR_FILE, check_features, fit_study
    from .options import split_list

    check_device(device)
    chosen = check_features(split_list(features) or []) if features is not None else list(FEATURES)  # a bad name fails before any model runs
    fit = fit_study(folder, method, score_on=score_on, device=device, log=click.echo, features=chosen)
    out = out if out is not None else folder / PREDICTOR_FILE
    fit.predictor.save(out)
    rows_path = fit.save_rows(folder)
    console = output_console()
    for line in fit_summary(fit.predictor):
        console.print(line)
    console.print(f"predictor written to [bold]{out}[/]; per-pair predictions to {rows_path} (shown by 'ktransfer report {folder}')")


def fit_summary(predictor) -> list[str]:
    """What the fit found, as lines: the noise of the realised Δs, the held-out rankings (leave-one-model-out first), the baselines."""
    from ..scout import FEATURE_LABELS

    e = predictor.evaluation
    noise, loso = e["noise"], e["loso"]

    def interval(r: dict) -> str:
        return f"{r['spearman']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}] (95% bootstrap over pairs; permutation p={r['p_value']:.3g}, n={r['n']})"

    lines = [
        f"{predictor.method} on {predictor.n_pairs} pairs of {e['students']} students ({predictor.setting.get('evaluated_on', '?')}): "
        f"mean Δ {noise['mean_delta']:+.2f}, spread (std over pairs) {noise['spread']:.2f}, noise of one Δ {noise['noise']:.2f} "
        f"(ratio {noise['spread_over_noise']:.1f}); {noise['significant']}/{noise['tested']} pairs at McNemar p < 0.05",
    ]
    lomo = e.get("lomo")
    if lomo is not None:
        lines.append(f"leave-one-model-out Spearman (the held-out model in no training pair), predicted vs realised: {interval(lomo)}")
        lines.append(f"  mean within-student Spearman: {e['within_student_mean_lomo']:+.2f}")
    else:
        lines.append(f"leave-one-model-out Spearman: not computed ({e.get('lomo_note') or 'not in this predictor; fit it again'})")
    lines += [
        f"leave-one-student-out Spearman (optimistic: the held-out student still teaches in training pairs): {interval(loso)}",
        f"  mean within-student Spearman: {e['within_student_mean']:+.2f}",
    ]
    for name, r in e["baselines"].items():
        lines.append(f"  {FEATURE_LABELS[name]} alone: {interval(r)}")
    if "test_lomo" in e:
        lines.append(f"leave-one-model-out against the Δs of {e['test_lomo']['study']}: {interval(e['test_lomo'])}")
    if "test" in e:
        lines.append(f"leave-one-student-out against the Δs of {e['test']['study']}: {interval(e['test'])}")
    if noise["spread_over_noise"] < 2:
        lines.append("the realised Δs spread little more than their noise: the correlations above mean little; fit on a setting with larger Δs")
    coefficients = ", ".join(f"{FEATURE_LABELS[n]} {c:+.3f}" for n, c in zip(predictor.features, predictor.coefficients))
    lines.append(f"coefficients per standard deviation: {coefficients}; intercept {predictor.intercept:+.3f}")
    return lines
