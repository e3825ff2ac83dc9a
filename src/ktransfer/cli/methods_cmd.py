from __future__ import annotations

import dataclasses

from ..output import output_console
from rich.table import Table

from .group import main


@main.command("methods")
def methods_command():
    """List the transfer methods with their hyperparameters, the paper's defaults and valid ranges."""
    from ..methods import METHODS

    table = Table(title="Transfer methods (set hyperparameters with --param KEY=VALUE)", show_lines=True)
    for column in ("method", "what it does", "default lr", "hyperparameters"):
        table.add_column(column)
    for name in sorted(METHODS):
        cls = METHODS[name]
        lines = []
        for f in dataclasses.fields(cls.Params):
            meta = f.metadata
            bounds = ""
            if meta.get("choices"):
                bounds = f" one of {', '.join(meta['choices'])}"
            elif meta.get("low") is not None or meta.get("high") is not None:
                bounds = f" in [{meta.get('low', '')}, {meta.get('high', '')}]"
            lines.append(f"{f.name} = {f.default!r}{bounds}: {meta.get('help', '')}")
        table.add_row(name, cls.summary, f"{cls.default_lr:g}", "\n".join(lines) or "–")
    output_console().print(table)
