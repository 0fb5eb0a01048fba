"""Errors that reach users as one line, never as a traceback."""
import argparse
import sys
from typing import NoReturn


class CheckpointError(ValueError):
    """A checkpoint or artifact on disk is unusable; the message names the file and the cause."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def bounded(kind: type, name: str, lo: float, hi: float | None = None):
    """An argparse `type` that parses `kind` and checks lo <= value (<= hi), naming the flag when not."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            span = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'} "
                                             f"{span}, got {text!r}")
        return value
    return parse
