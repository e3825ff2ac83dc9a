"""``python -m ktransfer``: the same command as ``ktransfer`` (for launchers such as ``torchrun -m``)."""

from .cli import main

main()
