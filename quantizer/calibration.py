"""Calibration windows: N windows of L tokens cut from the calibration text at seeded random offsets."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from qdllm.engine.corpus import DataError, read_texts, token_stream

# A checkpoint folder may ship calibration text drawn from its training data; the shipped model does.
DEFAULT_CALIB = Path("data") / "calibration.txt"


def calibration_file(src: Path, calib: Path | None) -> Path:
    """The --calib file, else the checkpoint's own default; refuses with how to give one."""
    if calib is not None:
        return calib
    if (src / DEFAULT_CALIB).is_file():
        return src / DEFAULT_CALIB
    raise DataError(f"--calib FILE is required: {src} ships no {DEFAULT_CALIB}. Give plain text or .jsonl with a "
                    "'text' field, drawn from text like the model's training data (the paper uses 128 windows "
                    "of C4 for LLaDA and Dream)")


def calibration_windows(tokenizer: PreTrainedTokenizerBase, file: Path, n: int, length: int, seed: int,
                        eos: int | None) -> torch.Tensor:
    """[n, length] token ids, each a window of the file's token stream starting at a seeded random offset."""
    ids = token_stream(tokenizer, read_texts(file), eos)
    if len(ids) < length:
        raise DataError(f"{file}: {len(ids)} tokens, fewer than one calibration window (--seqlen {length})")
    stream = torch.tensor(ids)
    starts = torch.randint(0, len(ids) - length + 1, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + length] for s in starts.tolist()])
