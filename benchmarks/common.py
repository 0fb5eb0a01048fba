"""What every benchmark result records about where it ran."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from qdllm.engine.evaluate import out_of_memory


def description(doc: str) -> str:
    """A script's `--help` description: its docstring's first paragraph, on one line."""
    return " ".join(doc.split("\n\n")[0].split())


def environment(device: torch.device) -> dict:
    """Device name, library versions, the git commit and the date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                               platform.machine())
    return {"device": name, "device_type": device.type, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": git_commit(), "date": datetime.date.today().isoformat()}


def listed(parse: Callable[[str], object], name: str):
    """An argparse `type` for a comma-separated list of `parse`d values (itself an argparse type), none twice."""
    def parse_list(text: str) -> list:
        items = text.split(",")
        if not text or "" in items:
            raise argparse.ArgumentTypeError(f"{name} must be a comma-separated list, got {text!r}")
        values = [parse(item) for item in items]
        if len(set(map(str, values))) < len(values):
            raise argparse.ArgumentTypeError(f"{name} names a value twice: {text!r}")
        return values
    return parse_list


def one_of(known: Iterable[str], what: str) -> Callable[[str], str]:
    """An argparse `type` that accepts a name in `known` (for lists: `listed(one_of(...), flag)`)."""
    known = tuple(known)

    def parse(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; expected some of {', '.join(known)}")
        return text
    return parse


def confidence(name: str, none: bool = False):
    """An argparse `type` for a threshold in (0, 1] (bounded's ranges include their ends, and 0 would commit every
    token); with `none`, the word none too (the linear schedule)."""
    def parse(text: str) -> float | None:
        if none and text == "none":
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1:  # NaN fails it too
            raise argparse.ArgumentTypeError(f"{name} must be {'none or ' if none else ''}a number in (0, 1], "
                                             f"got {text!r}")
        return value
    return parse


def result_path(out: Path, suffix: str) -> Path:
    """OUT with `suffix` appended: a dot in OUT's name (run.v1, a model folder llada.v2) is kept, not replaced."""
    return out.with_name(out.name + suffix)


def check_output(flag: str, out: Path, inputs: Iterable[Path | None] = (), suffixes: Iterable[str] = (".json", ".png")
                 ) -> None:
    """Refuse, before any work, an output prefix whose files could not be written, or would land in an input
    (a model folder, a data file): a benchmark's result must never replace what it measured."""
    parent = out.parent.resolve()
    for p in (parent, *parent.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {out}: {p} is a file, not a directory")
    files = {result_path(out, s).resolve() for s in suffixes}
    for src in inputs:
        if src is not None and (parent == src.resolve() or parent.is_relative_to(src.resolve())
                                or src.resolve() in files):
            raise ValueError(f"{flag} {out}: lies in the input {src}; results are never written among a "
                             "benchmark's inputs")
    try:  # a real file: os.access says yes to root everywhere, /proc included
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {out}: {parent} is not writable ({e.strerror})") from None


def run_main(main: Callable[[], None]) -> None:
    """Run a benchmark's main: a refusal (ValueError, which qdllm's checkpoint, data and request errors are) or
    an OS error ends in one line naming the script, exit status 2, never a traceback; running out of host or
    device memory ends in one line too, exit status 1."""
    prog = Path(sys.argv[0]).name
    try:
        main()
    except (ValueError, OSError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        # torch's message runs to several lines of allocator advice
        print(f"{prog}: error: out of memory ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
              "try smaller settings", file=sys.stderr)
        sys.exit(1)


def write_results(out: Path, record: dict, plot: Callable[[Path, dict], None]) -> None:
    """OUT.json (the record) and OUT.png (its plot); NaN, which JSON lacks, is written as null."""
    out.parent.mkdir(parents=True, exist_ok=True)
    result_path(out, ".json").write_text(json.dumps(no_nan(record), indent=2, default=str) + "\n")
    plot(result_path(out, ".png"), record)
    print(f"wrote {result_path(out, '.json')} and {result_path(out, '.png')}")


def no_nan(value: object) -> object:
    """`value` with every NaN float replaced by None: JSON has no NaN (a one-sample standard error is one)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return value


def git_commit() -> str:
    """QDLLM_COMMIT where set (a copied tree's .git, if any, may be stale), else HEAD (with -dirty for
    tracked changes)."""
    if os.environ.get("QDLLM_COMMIT"):
        return os.environ["QDLLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # A benchmark rewrites its own tracked result file as it goes; that alone is not a dirty tree.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude)benchmarks/results"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_weight(n: int, k: int, g: int, seed: int, device: torch.device):
    """A random packed [n, k] weight with ABMP's order mix (5% of blocks order 1, 5% order 3, the rest 2),
    built on `device`; speed does not depend on the values."""
    from qdllm.kernels import BCQWeight

    gen = torch.Generator(device=device).manual_seed(seed)
    nb = k // g
    r = min(math.floor(nb * 0.05), nb // 2)
    orders = torch.full((nb,), 2, dtype=torch.int32, device=device)
    perm = torch.randperm(nb, generator=gen, device=device)
    orders[perm[:r]], orders[perm[r:2 * r]] = 1, 3
    p = 2 * nb
    return BCQWeight(
        planes=torch.randint(-2**31, 2**31, (p, g // 32, n), dtype=torch.int32, device=device, generator=gen),
        alpha_r=(torch.rand(p, n, device=device, generator=gen) * 0.02 + 0.005).half(),
        alpha_c=(torch.rand(p, g, device=device, generator=gen) + 0.5).half(),
        plane_ptr=torch.cat([orders.new_zeros(1), orders.cumsum(0, dtype=torch.int32)]),
        in_features=k, block_size=g)
