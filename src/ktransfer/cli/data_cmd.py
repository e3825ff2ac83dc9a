from __future__ import annotations

import click

from .group import main


@main.group("data")
def data_group():
    """Get and inspect the embedded dataset (Fashion-MNIST)."""


@data_group.command("download")
@click.option("--url", default=None, help="Base URL of the four .gz IDX files (default: the dataset's official mirror).")
def download_command(url):
    """Download Fashion-MNIST into the user's cache (where every command then finds it)."""
    from ..data import fashion_mnist

    folder = fashion_mnist.download(base_url=url or fashion_mnist.DOWNLOAD_URL)
    click.echo(f"Fashion-MNIST is in {folder}")


@data_group.command("where")
def where_command():
    """Show which Fashion-MNIST folder the commands will use."""
    from ..data import fashion_mnist

    click.echo(str(fashion_mnist.locate()))
