"""What every benchmark result records about where it ran."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


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


def write_results(out: Path, record: dict, plot: Callable[[Path, dict], None]) -> None:
    """OUT.json (the record) and OUT.png (its plot)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    plot(out.with_suffix(".png"), record)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


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
