"""benchmarks/gpu.sh refuses bad steps and limits with one line, before it looks for a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.sh"


def gpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("args, env, message", [
    (("check", "kernels"), {},
     "gpu.sh: unknown step 'kernels'; steps: check kernels-llada kernels-dream convert e2e e2e-graphs serve"),
    (("e2e:ten",), {}, "gpu.sh: 'e2e:ten': expected STEP:LIMIT, LIMIT in whole seconds"),
    (("e2e:0",), {}, "gpu.sh: 'e2e:0': expected STEP:LIMIT, LIMIT in whole seconds"),
    ((), {"STEP_LIMIT": "5m"}, "gpu.sh: STEP_LIMIT: expected whole seconds, got '5m'"),
])
def test_gpu_script_refuses_bad_arguments(args, env, message):
    r = gpu_sh(*args, **env)
    assert (r.returncode, r.stdout.strip(), r.stderr) == (2, message, "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_script_measures_nothing_without_cuda():
    r = gpu_sh("e2e:60")
    message = f"gpu.sh: {sys.executable} sees no CUDA GPU; nothing was measured"
    assert (r.returncode, r.stdout.strip(), r.stderr) == (2, message, "")
