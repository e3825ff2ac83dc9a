"""Options and parsers shared by several commands."""

from __future__ import annotations

import click

from ..errors import ConfigError

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="KTRANSFER_FASHION_MNIST",
    help="Folder with the Fashion-MNIST IDX files (default: $KTRANSFER_FASHION_MNIST, Debian's dataset-fashion-mnist, then the download cache).",
)


def split_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items or None


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    """``KEY=VALUE`` pairs into a dict; values are typed later against the method's declaration."""
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param takes KEY=VALUE; got {pair!r}")
        params[key.strip()] = value.strip()
    return params


def parse_seeds(value: str | None) -> list[int] | None:
    """``0,1,2`` into ``[0, 1, 2]``; a clear error for anything that is not a list of integers."""
    items = split_list(value)
    if items is None:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ConfigError(f"seeds must be comma-separated integers such as 0,1,2; got {value!r}") from None
