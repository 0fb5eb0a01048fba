"""Errors that reach users as one line, never as a traceback."""
import argparse
import math
import sys
from typing import NoReturn


class CheckpointError(ValueError):
    """A checkpoint or artifact on disk is unusable; the message names the file and the cause."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


SEED_MAX = 2**32 - 1  # seeds are combined with window or sample indices; this keeps them within torch's range


def bounded(kind: type, name: str, lo: float, hi: float | None = None):
    """An argparse `type` that parses `kind` and checks lo <= value (<= hi), naming the flag when not."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is not None and kind is float and not math.isfinite(value):
            value = None  # no flag means NaN or inf (and NaN would pass the comparisons below)
        if value is None or value < lo or (hi is not None and value > hi):
            span = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if kind is int else 'a number'} "
                                             f"{span}, got {text!r}")
        return value
    return parse


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(name: str):
    """An argparse `type` for a size in bytes: a number with an optional unit, such as 2GiB, 512MiB or 1.5GB."""
    def parse(text: str) -> int:
        number = text.strip().rstrip("bBiIkKmMgG")
        unit = text.strip()[len(number):].upper()
        try:
            value = float(number) * UNITS[unit]
        except (ValueError, KeyError):
            value = math.nan
        if not 1 <= value < math.inf:
            raise argparse.ArgumentTypeError(f"{name} must be a size such as 2GiB, 512MiB or a number of bytes, "
                                             f"got {text!r}")
        return int(value)
    return parse


class RequestError(ValueError):
    """A request the engine can never run. `field` names what to change: a SamplingParams field, "prompt" or
    "suffix", so a front end can point its client at the right parameter."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
