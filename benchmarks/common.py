"""What every benchmark result records about where it ran."""
from __future__ import annotations

import datetime
import platform
import subprocess

import torch


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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
