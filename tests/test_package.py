"""The install: one `qdllm` namespace, nothing installed top-level, console scripts present."""
import subprocess
import sys
from pathlib import Path

import pytest


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_subpackages_import_under_qdllm(tmp_path):
    r = run_python("import qdllm.engine, qdllm.kernels, qdllm.quantizer, qdllm.server; print('ok')", tmp_path)
    assert r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("name", ["kernels", "engine", "server", "quantizer"])
def test_folders_are_not_installed_top_level(tmp_path, name):
    """`kernels` is also a PyPI package that transformers probes for; nothing may shadow it."""
    r = run_python(f"import importlib.util; print(importlib.util.find_spec({name!r}))", tmp_path)
    assert r.stdout.strip() == "None", r.stdout


def test_engine_and_server_do_not_import_the_quantizer(tmp_path):
    r = run_python("import sys, qdllm.engine, qdllm.server; print(any('quantizer' in m for m in sys.modules))",
                   tmp_path)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize("script", ["qdllm-convert", "qdllm-serve", "qdllm-eval"])
def test_console_scripts_are_installed(script):
    assert (Path(sys.prefix) / "bin" / script).exists()
