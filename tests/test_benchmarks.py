"""benchmarks/gpu.sh refuses bad steps and limits with one line, before it looks for a GPU; e2e.py runs on the CPU
on the shipped model and its 2-bit artifact."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
ASSET = ROOT / "assets" / "llada-shakespeare"


def gpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("args, env, message", [
    (("check", "kernels"), {},
     "gpu.sh: unknown step 'kernels'; steps: check kernels-llada kernels-dream kernels-mma mma-branches convert e2e "
     "e2e-graphs profile serve"),
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


def test_e2e_on_the_cpu_with_a_converted_artifact(tmp_path, shipped_artifact):
    """The CPU path of e2e.py (--model with --artifact): one dense and one 2-bit configuration, with the
    artifact's effective bits in the record, and a profiled run of each (no device time on a CPU)."""
    art = shipped_artifact
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--model", str(ASSET), "--artifact",
                        str(art), "--gen", "32", "--batch", "1", "--repeats", "1", "--configs", "bd", "--profile",
                        "--out", str(tmp_path / "e2e")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "e2e-llada-shakespeare-cpu.json").read_text())
    manifest = json.loads((art / "qdllm.json").read_text())
    assert record["complete"] and record["settings"]["effective_bits"] == manifest["effective_bits"]
    assert [(x["config"], x["batch"]) for x in record["results"]] == [("d", 1), ("b", 1)]
    assert all(x["tokens_per_s"]["median"] > 0 and x["nfe_per_request"] <= 32 for x in record["results"])
    positions = [round(x["kv_pool_gb"] * 1e9) / 18432 for x in record["results"]]  # fp32: 18432 bytes a position
    assert all(p > 1 and (p - 1) % 16 == 0 for p in positions), positions  # whole pages and the scratch
    assert [row["weights"] for row in record["fits"]].count("2bit") == len(record["fits"]) // 2
    for x in record["results"]:
        pr = x["profile"]
        assert pr["steps"] >= x["nfe_per_request"] and pr["wall_ms_per_step"] > 0 and pr["cpu_ops_per_step"] > 50
        assert (pr["device_busy_ms_per_step"], pr["device_ops_per_step"], pr["kernel_launches_per_step"],
                pr["top_kernels"]) == (0, 0, 0, [])
    assert "ms wall" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton's compiler")
def test_sass_count_finds_the_plane_and_step_loops(tmp_path):
    """The dequantize kernel compiled for sm_90 and disassembled: its plane loop nests in its 32-column step
    loop, and the count per weight is of the order the kernel's unpacking takes (about one warp-instruction)."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_count.py"), "--launches", "dequantize",
                        "--out", str(tmp_path / "count")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads((tmp_path / "count.json").read_text())["rows"]
    assert row["launch"] == "dequantize" and row["registers"] > 0
    assert 0 < row["plane_loop"] < row["plane_loop"] + row["step_rest"] < row["instructions"]
    assert 0.2 < row["warp_instructions_per_weight"] < 5


def bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


SMALL = ("--shape", "llada-small", "--configs", "b", "--gen", "8", "--block", "8", "--batch", "1", "--prompt-len", "8",
         "--repeats", "1")


@pytest.mark.parametrize("script, args, message", [
    ("e2e.py", (*SMALL, "--batch", "1,,2"), "--batch must be a comma-separated list, got '1,,2'"),
    ("e2e.py", (*SMALL, "--block", "3"), "--tokens-per-step 4: --gen 8 in 3 block(s) of --block 3 takes at most 2"),
    ("e2e.py", ("--shape", "llada-small", "--fits-only", "--gen", "-2000"), "--gen must be an integer at least 1"),
    ("engine.py", ("--prompts", "5000"), "holds 2857 speeches, fewer than the 5000 asked for"),
    ("engine.py", ("--out", "assets/llada-shakespeare/config.x"), "lies in the input assets/llada-shakespeare"),
    ("quality.py", ("assets/llada-shakespeare", "--variants", "fp", "--out", "assets/llada-shakespeare/config"),
     "lies in the input assets/llada-shakespeare; results are never written among a benchmark's inputs"),
    ("quality.py", ("assets/llada-shakespeare", "--variants", "fp,fp"), "--variants names a value twice: 'fp,fp'"),
    ("convert.py", ("--seed", "99999999999999999999999"), "--seed must be an integer in [0, 4294967295]"),
    ("sass_count.py", ("--arch", "100"), "invalid choice: 100 (choose from 80, 86, 87, 89, 90)"),
    ("kernels.py", ("--block-size", "48"), "--block-size must be a multiple of 32, got '48'"),
    ("serve.py", ("--url", "http://127.0.0.1:8000", "--extra", '{"stream": false}'),
     "--extra must not set 'stream': the benchmark sets it"),
    ("serve.py", ("--url", "notaurl"), "--url must be a server's base address such as http://127.0.0.1:8000"),
    ("train_tiny.py", ("--out", "assets/llada-shakespeare"),
     "--out assets/llada-shakespeare is not empty; pass --overwrite to replace the model there"),
    ("train_tiny.py", ("--out", "build/never", "--grad-clip", "nan"), "--grad-clip must be a number in [1e-06, "),
    ("train_tiny.py", ("--out", "build/never", "--d-model", "100000"), "--d-model must be an integer in [2, 8192]"),
    ("train_tiny.py", ("--out", "build/never", "--warmup-steps", "10", "--steps", "5"),
     "--warmup-steps (10) must be at most --steps (5)"),
])
def test_benchmarks_refuse_bad_input_in_one_line(script, args, message):
    """Before these checks, such flags ended in tracebacks (some after minutes of measuring), ran on with nonsense,
    or wrote results over the model they measured (an --out of MODEL/config replaced its config.json)."""
    before = {f: f.stat().st_mtime_ns for f in ASSET.rglob("*")}
    r = bench(script, *args)
    assert r.returncode == 2 and r.stderr.startswith(f"{script}: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert {f: f.stat().st_mtime_ns for f in ASSET.rglob("*")} == before
    assert not (ROOT / "build" / "never").exists()


def test_run_main_reports_running_out_of_memory_in_one_line(capsys):
    """An allocation failure during a measurement is one line (torch's own message runs to several), exit 1;
    any other error still shows its traceback."""
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    def fail(e: BaseException):
        def main() -> None:
            raise e
        return main

    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nIf reserved but unallocated ...")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                       "tried to allocate 68719476736 bytes.")
    for error, shown in ((cuda, "CUDA out of memory. Tried to allocate 2.00 GiB."), (cpu, "can't allocate memory")):
        with pytest.raises(SystemExit) as exit_:
            common.run_main(fail(error))
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count("\n") == 1 and shown in err, err
        assert err.endswith("); try smaller settings\n") and "If reserved" not in err
    with pytest.raises(RuntimeError, match="a bug"):
        common.run_main(fail(RuntimeError("a bug")))
