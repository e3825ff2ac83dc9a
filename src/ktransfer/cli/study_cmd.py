from __future__ import annotations

from pathlib import Path

import click

from .group import main
from .options import data_dir_option, split_list


@main.command("study")
@click.argument("config", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Study folder (default: ./NAME, NAME from the config; for a folder given as CONFIG, that folder).")
@click.option("--status", "show_status", is_flag=True, help="Only show how many runs are done, failed, interrupted and still to do, and the errors of the failed ones.")
@click.option("--compare", metavar="METHOD,REFERENCE", default=None, help="Only compare two methods' finished runs head to head on the pairs, settings and seeds they share, e.g. --compare kl_dp_soft,kl_dp: pairs ahead and behind (sign test) and images right after only one of them (McNemar). See docs/study.md.")
@click.option("--retry-failed", is_flag=True, help="Run the failed runs again (by default they stay recorded as failed and are skipped).")
@click.option("--device", default=None, help="Torch device for the runs, e.g. cuda (default: the config's, else cpu).")
@click.option("--executor", type=click.Choice(["local", "processes", "ray"]), default=None, help="Where the runs execute: local (this process, one after another; the default unless the config says otherwise), processes (worker processes on this machine, as many as its CPUs hold at cpus_per_run threads each; no extra needed) or ray (Ray tasks, several at a time; needs ktransfer[ray]). See docs/scale.md.")
@click.option("--address", default=None, help="With --executor ray: the address of a running Ray cluster (default: start a local Ray instance sized to this machine).")
@click.option("--controls/--no-controls", default=None, help="--no-controls skips the ce and self controls (by default the config's 'controls' key chooses them: both, once per student, learning rate and seed).")
@data_dir_option
def study_command(config, out, show_status, compare, retry_failed, device, executor, address, controls, data_dir):
    """Run a study: every student × teacher × method × seed of CONFIG, stored run by run.

    CONFIG is a YAML (or JSON) file, or a study folder (it keeps a copy of its config). Each
    finished run is committed at once to study.db in the folder, so running the same command
    again continues where it stopped: finished runs are skipped, an interrupted one is redone,
    failed ones stay recorded with their error. Results: results.csv and results.jsonl in the
    folder, `ktransfer report FOLDER`, or ktransfer.study.load_results(FOLDER) in Python.

    Example: ktransfer study examples/zoo-study.yaml --out zoo-study   (add --executor ray for several runs at a time)
    """
    from ..output import output_console
    from ..study import Study

    study = Study.open(config, out, data_dir=data_dir)
    if controls is False:
        study.config.controls = []
    console = output_console(highlight=False)
    if show_status:
        print_status(console, study.status())
        return
    if compare is not None:
        print_comparison(console, compare_pair(compare, study.folder))
        return
    status = study.run(retry_failed=retry_failed, log=lambda line: console.print(line, soft_wrap=True), device=device, executor=executor, address=address)
    print_status(console, status)
    console.print(f"Report: ktransfer report {study.folder}")


def compare_pair(text: str, folder: Path) -> dict:
    from ..study import compare_methods

    names = split_list(text) or []
    if len(names) != 2:
        raise click.BadParameter(f"give two method names, METHOD,REFERENCE (got {text!r})", param_hint="--compare")
    return compare_methods(folder, *names)


def print_comparison(console, result: dict) -> None:
    from ..tables import head_to_head_line, head_to_head_table

    console.print(head_to_head_table(result))
    console.print(head_to_head_line(result))


def print_status(console, status: dict) -> None:
    from rich.table import Table

    table = Table(title=f"Study in {status['folder']}" + (" (a process is running it now)" if status["active"] else ""))
    for column in ("phase", "planned", "done", "failed", "interrupted", "remaining"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase, counts in status["phases"].items():
        if counts["planned"] == 0:
            continue
        remaining = counts["pending"] + counts["running"]
        table.add_row(phase, str(counts["planned"]), str(counts["done"]), str(counts["failed"]), str(counts["running"]), str(remaining))
    console.print(table)
    if status["waiting_for_search"]:
        console.print(f"{status['waiting_for_search']} study runs wait for the hyperparameter search to pick their setting")
    if status["failed_runs"]:
        failures = Table(title="Failed runs (rerun them with --retry-failed)")
        for column in ("phase", "method", "teacher → student", "seed", "error"):
            failures.add_column(column)
        for run in status["failed_runs"]:
            failures.add_row(run["phase"], run["method"], f"{run['teacher']} → {run['student']}", str(run["seed"]), run["error"] or "")
        console.print(failures)
