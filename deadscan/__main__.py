"""``python -m deadscan`` (and ``torchrun -m deadscan``) runs the command line."""

from .cli import main

main(prog_name="deadscan")
