"""The `vitalproof` command and the demo: the only code that prints for people and exits."""

from vitalproof.cli.main import main

__all__ = ["main"]
