"""The HTML report of a study or demo folder: ``build_report(folder)`` (needs ``pip install 'ktransfer[report]'``).

One self-contained page (figures embedded as PNG, opens from disk with no server) plus the same
figures as PNG files beside it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from ..extras import available, require
from ..paths import atomic_write_bytes

REPORT_FILE = "report.html"


@dataclass
class ReportResult:
    html: Path
    figures: list[Path] = field(default_factory=list)


def report_available() -> bool:
    """Whether the packages of the ``report`` extra are installed."""
    return available("matplotlib")


def build_report(folder: str | Path, out: str | Path | None = None) -> ReportResult:
    """Write ``report.html`` and one PNG per figure into ``out`` (default: ``folder``)."""
    require("matplotlib", "report", "ktransfer report")
    from .data import load
    from .figures import FIGURES
    from .html import render

    folder = Path(folder)
    out = Path(out) if out is not None else folder
    out.mkdir(parents=True, exist_ok=True)
    data = load(folder)
    figures: dict[str, tuple[str, bytes]] = {}
    written = []
    for name, (draw, title) in FIGURES.items():
        figure = draw(data)
        if figure is None:
            continue
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        png = buffer.getvalue()
        figures[name] = (title, png)
        path = out / f"{name}.png"
        atomic_write_bytes(path, png)
        written.append(path)
    html_path = out / REPORT_FILE
    atomic_write_bytes(html_path, render(data, figures).encode("utf-8"))
    return ReportResult(html_path, written)


__all__ = ["REPORT_FILE", "ReportResult", "build_report", "report_available"]
