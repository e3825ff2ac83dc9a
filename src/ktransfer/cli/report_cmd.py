from __future__ import annotations

from pathlib import Path

import click

from .group import main


@main.command("report")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where to write report.html and the PNG figures (default: FOLDER).")
def report_command(folder, out):
    """Write an HTML report of a study or demo folder: one self-contained page plus its figures as PNG.

    The page opens from disk in any browser (figures are embedded, nothing is fetched). It shows the
    success rate per method, per-student tables, knowledge gain against loss, Δ against the accuracy
    gap, Δ over epochs, the complementarity heatmap and per-class views, and multi-teacher runs
    where the folder has them. Needs: pip install 'ktransfer[report]'.

    Example: ktransfer report ktransfer-demo
    """
    from ..report import build_report

    result = build_report(folder, out)
    click.echo(f"Report: {result.html}")
    if result.figures:
        click.echo("Figures: " + ", ".join(path.name for path in result.figures))
