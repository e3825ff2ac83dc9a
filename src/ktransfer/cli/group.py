"""The ``ktransfer`` command group, apart from the commands (which register on it), so that nothing imports in a circle."""

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
