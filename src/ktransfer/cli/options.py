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


# ---------------------------------------------------------------- the settings' options

_METAVARS = {int: "N", float: "X"}


def settings_options(exclude: tuple[str, ...] = ()):
    """Click options for the fields of :class:`~ktransfer.TransferSettings`, one spelling each (``--batch-size`` for
    ``batch_size``), their help from the field. Each defaults to "not given", so the settings' own default applies;
    :func:`settings_from_options` turns the values into settings, which validate them."""
    import dataclasses

    from ..settings import TransferSettings, setting_kind

    def decorate(command):
        for f in reversed(dataclasses.fields(TransferSettings)):
            if f.name in exclude:
                continue
            kind, choices = setting_kind(f), f.metadata["choices"]
            help_text = f.metadata["help"]
            if kind is bool:
                command = click.option(f"--{f.name.replace('_', '-')}", f.name, is_flag=True, default=None, help=help_text)(command)
                continue
            if f.default is not None and "default:" not in help_text:
                help_text += f"  [default: {f.default}]"
            click_type = click.Choice(choices) if choices else kind
            metavar = None if choices else _METAVARS.get(kind, "TEXT")
            command = click.option(f"--{f.name.replace('_', '-')}", f.name, type=click_type, default=None, metavar=metavar, help=help_text)(command)
        return command

    return decorate


def settings_from_options(values: dict, **fixed):
    """The :class:`~ktransfer.TransferSettings` of a command's options (those given; ``fixed`` set by the command itself)."""
    from ..settings import TransferSettings

    given = {k: v for k, v in values.items() if k in TransferSettings.names() and v is not None}
    return TransferSettings(**given, **fixed)


def pop_settings(values: dict) -> dict:
    """Take the settings' options out of a command's keyword arguments (what is left: its other options)."""
    from ..settings import TransferSettings

    return {name: values.pop(name) for name in TransferSettings.names() if name in values}
