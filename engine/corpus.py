"""Text files for evaluation and calibration: plain text, or JSON lines with a `text` field."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase


class DataError(ValueError):
    """A data file that cannot be used; the message is one line naming the file."""


def read_texts(path: str | Path) -> list[str]:
    """The documents in a file: a `.jsonl` file holds one per line ({"text": ...}); any other file is one."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found (expected a plain-text or .jsonl file)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory (expected a plain-text or .jsonl file)") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        texts = [raw]
    else:
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                expected = 'one {"text": ...} object per line'
                raise DataError(f"{path}:{n}: not valid JSON (expected {expected})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{n}: expected an object with a string field 'text'")
            try:
                record["text"].encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{n}: 'text' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), "
                                "which is not Unicode text") from None
            texts.append(record["text"])
    if not any(t.strip() for t in texts):
        raise DataError(f"{path}: holds no text")
    return texts


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: list[str], separator: int | None) -> list[int]:
    """All documents as one token stream, with `separator` (EOS) between documents."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i and separator is not None:
            ids.append(separator)
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return ids
