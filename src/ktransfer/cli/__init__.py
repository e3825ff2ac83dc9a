"""The ``ktransfer`` command: a thin layer over the Python API. One module per command."""

from __future__ import annotations

import click

from ..errors import KTransferError


class Group(click.Group):
    """Turns every user-caused error into one clear line (``Error: ...``) instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KTransferError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ktransfer")
def main():
    """Find the complementary knowledge between pretrained classifiers and transfer it without forgetting.

    Start with `ktransfer demo`: it trains a small zoo on Fashion-MNIST and transfers between every pair.
    """


from . import data_cmd, demo_cmd, methods_cmd, transfer_cmd  # noqa: E402,F401  (register the commands)
from . import analyze_cmd, report_cmd, study_cmd  # noqa: E402,F401
from . import adapt_cmd  # noqa: E402,F401
from . import precompute_cmd, scout_cmd  # noqa: E402,F401
