"""Where the commands' tables and lines go: a terminal, or a file or pipe that a log keeps.

On a terminal, rich's own console (its width, colours and live progress bars). Anywhere else
(``ktransfer demo > log.txt``, a pipe, CI) a console wide enough that no table is cut to fit
80 columns, without colour codes; live progress bars do not draw there, and the commands print
one line per finished run instead.
"""

from __future__ import annotations

import sys

from rich.console import Console

# Wide enough for every table ktransfer prints (the widest, the demo's per-pair table, is under 200
# columns): rich sizes a table to its content, so a narrower table stays narrow.
LOG_WIDTH = 400


def output_console(stderr: bool = False, **options) -> Console:
    """The console a command prints its output with (see the module's note); ``stderr``: onto standard error."""
    if _is_terminal(sys.stderr if stderr else sys.stdout):
        return Console(stderr=stderr, **options)
    return Console(stderr=stderr, width=LOG_WIDTH, color_system=None, **options)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
