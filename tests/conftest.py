import os

import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU interpreter; must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import write_checkpoint

from qdllm.engine.kv_cache import KVPool


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llada"), "llada")


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("dream"), "dream")


@pytest.fixture(scope="session", params=["llada", "dream"])
def model_dir(request, llada_dir, dream_dir) -> Path:
    return llada_dir if request.param == "llada" else dream_dir


@pytest.fixture
def device_room(monkeypatch):
    """`device_room(pages)`: from then on, KV pools live on a pretend device with room for `pages` pages, where
    a larger pool fails as a CUDA allocation does, with torch.OutOfMemoryError."""
    def limit(pages: int) -> None:
        resize = KVPool._resize

        def within(pool: KVPool, n: int) -> None:
            if n > pages:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a pool of {n} pages")
            resize(pool, n)
        monkeypatch.setattr(KVPool, "_resize", within)
    return limit


@pytest.fixture(scope="session")
def shipped_artifact(tmp_path_factory) -> Path:
    """The shipped model converted once (16 calibration windows of 64 tokens); tests that edit it copy it."""
    art = tmp_path_factory.mktemp("shipped") / "shakespeare-2bit"
    asset = Path(__file__).parents[1] / "assets" / "llada-shakespeare"
    r = subprocess.run([str(Path(sys.executable).parent / "qdllm-convert"), str(asset), str(art), "--nsamples", "16",
                        "--seqlen", "64", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return art
