import os

import torch

if not torch.cuda.is_available():  # run the Triton kernels on the CPU interpreter; must precede any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
from tiny import write_checkpoint


@pytest.fixture(scope="session")
def llada_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llada"), "llada")


@pytest.fixture(scope="session")
def dream_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("dream"), "dream")


@pytest.fixture(scope="session", params=["llada", "dream"])
def model_dir(request, llada_dir, dream_dir) -> Path:
    return llada_dir if request.param == "llada" else dream_dir
