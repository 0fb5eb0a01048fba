"""SASS count: warp-instructions per weight of every autotuned BCQ tile, from the compiled code; no GPU needed.

    python benchmarks/sass_count.py [--arch 90] [--dtype bf16] [--launches gemv,fma,dequantize,mma]

The kernels are bound by instruction issue on unpacking (DEVELOPERS.md, "kernels/, file by file"), so this
count ranks tiles and kernel changes before a GPU times them. Every configuration of the split-K ("gemv")
and FMA launches, in each of their variants, and the dequantize kernel, is compiled by Triton for the
target and disassembled with the nvdisasm that Triton ships. A program with K_BLOCKS = 1 (one K-block of
G = 128 columns) runs the code outside its loops once, its 32-column step loop G/32 times, and the plane
loop inside it once a plane: 2.05 times a block with ABMP's mix (5% of blocks order 1, 5% order 3), or once
fewer where the code takes the first plane before the loop (the dequantize paths). The Gluon "mma" launch
(kernels/bcq_mma.py) has no 32-column step loop: its plane loop covers the whole block, after a first plane
outside it. That count over the weights the program covers is the figure; the issue time at full rate is
the count times the weights over (SMs x 4 schedulers x clock), given for a 4096x4096 weight on an H100
(132 SMs, 1.755 GHz). These are counts, not times: latency, occupancy and memory traffic are not modelled.
Writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from common import check_output, description, environment, listed, result_path, run_main
from qdllm.engine.errors import ArgumentParser

PLANES = 2.05  # planes a block with ABMP's mix
PEELED = ("dequant", "dequantize")  # variants whose code takes a block's first plane before the plane loop
H100_ISSUE = 132 * 4 * 1.755e9  # warp-instructions a second
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
BRANCH = re.compile(r"BRA `\((\.L_x_\d+)\)")
ARCHS = (80, 86, 87, 89, 90)  # targets whose code has the loops counted here (Gluon's mma needs sm_80 or later)
LAUNCHES = ("gemv", "fma", "dequantize", "mma")


def loops(sass: str) -> tuple[int, list[tuple[int, int]]]:
    """(instructions, [(first, last) instruction index of each loop, from its label to its backward branch])."""
    count, labels, spans = 0, {}, []
    for line in sass.splitlines():
        if m := LABEL.match(line):
            labels[m[1]] = count
        elif m := INSTRUCTION.match(line):
            if (b := BRANCH.search(m[1])) and b[1] in labels:
                spans.append((labels[b[1]], count))
            count += 1
    return count, [(a, b) for a, b in spans if b - a > 1]  # not the trailing self-branch


def per_weight(sass: str, steps: int, trips: float, warps: int, weights: int) -> dict:
    """Warp-instructions per weight of one program: the innermost loop is the plane loop, the loop around it
    the 32-column step."""
    total, spans = loops(sass)
    plane = min(spans, key=lambda s: s[1] - s[0])
    step = min((s for s in spans if s[0] < plane[0] and s[1] > plane[1]), key=lambda s: s[1] - s[0])
    n_plane, n_step = plane[1] - plane[0] + 1, step[1] - step[0] + 1
    count = warps * (total - n_step + steps * (n_step - n_plane + trips * n_plane))
    return {"instructions": total, "plane_loop": n_plane, "step_rest": n_step - n_plane,
            "outside_loops": total - n_step, "warp_instructions_per_weight": count / weights,
            "h100_issue_us_4096x4096": count / weights * 4096 * 4096 / H100_ISSUE * 1e6}


def per_weight_block(sass: str, trips: float, warps: int, weights: int) -> dict:
    """As `per_weight`, for a program whose one loop inside the K-block loop is the plane loop over the block."""
    total, spans = loops(sass)
    plane = min(spans, key=lambda s: s[1] - s[0])
    n_plane = plane[1] - plane[0] + 1
    count = warps * (total - n_plane + trips * n_plane)
    return {"instructions": total, "plane_loop": n_plane, "outside_plane_loop": total - n_plane,
            "warp_instructions_per_weight": count / weights,
            "h100_issue_us_4096x4096": count / weights * 4096 * 4096 / H100_ISSUE * 1e6}


def compile_one(fn, signature: dict, constants: dict, warps: int, arch: int, tools: Path, tmp: Path,
                gluon: bool = False) -> tuple[str, dict]:
    """SASS and resource usage (registers, stack bytes) of one specialisation. Pointers are taken as 16-byte
    aligned, as Triton specialises them at a launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {**signature, **{k: "constexpr" for k in constants}}
    aligned = {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(signature.values()) if ty.startswith("*")}
    source = (GluonASTSource if gluon else ASTSource)(fn, sig, constants, aligned)
    k = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 3})
    cubin = tmp / "kernel.cubin"
    cubin.write_bytes(k.asm["cubin"])
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True)
    usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    return sass.stdout, {"registers": int(re.search(r"REG:(\d+)", usage)[1]),
                         "stack_bytes": int(re.search(r"STACK:(\d+)", usage)[1])}


def parse_launch(text: str) -> str:
    if text not in LAUNCHES:
        raise argparse.ArgumentTypeError(f"unknown launch {text!r}; expected some of {', '.join(LAUNCHES)}")
    return text


def main() -> None:
    ap = ArgumentParser(description=description(__doc__))
    ap.add_argument("--arch", type=int, choices=ARCHS, default=90,
                    help=f"compute capability as an integer: {', '.join(map(str, ARCHS))}")
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help="activation dtype")
    ap.add_argument("--launches", type=listed(parse_launch, "--launches"), default=",".join(LAUNCHES),
                    help=f"comma-separated: {', '.join(LAUNCHES)}")
    ap.add_argument("--out", type=Path, default=None, help="output path stem (default: results/sass-count-sm<arch>)")
    args = ap.parse_args()
    launches = args.launches
    out = args.out or Path(__file__).parent / "results" / f"sass-count-sm{args.arch}"
    check_output("--out", out)
    if importlib.util.find_spec("triton") is None:
        raise ValueError("needs Triton's compiler (pip install triton)")
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the interpreter compiles nothing
    import triton.backends.nvidia

    from qdllm.kernels import bcq, bcq_mma

    tools = Path(triton.backends.nvidia.__file__).parent / "bin"
    if not (tools / "nvdisasm").is_file():
        raise ValueError(f"needs the nvdisasm that Triton's NVIDIA backend ships; {tools} has none")
    ptr = {"x_ptr": "*" + args.dtype, "planes_ptr": "*i32", "ar_ptr": "*fp16", "ac_ptr": "*fp16", "pp_ptr": "*i32",
           "bias_ptr": "*fp16", "y_ptr": "*fp32", "M": "i32", "N": "i32", "NB": "i32", "stride_xm": "i32",
           "M_BUCKET": "i32"}
    jobs = []  # (launch, variant, constants, warps, weights a program covers)
    for launch in (x for x in launches if x in ("gemv", "fma")):
        for cfg in bcq._configs(launch):
            kw = {**cfg.kwargs, "K_BLOCKS": 1}  # one K-block a program, as the count assumes
            for variant in ("fma",) if launch == "fma" else ("dequant", "per_plane"):
                const = {"G": 128, "HAS_BIAS": False, "VARIANT": variant, "UPCAST": False, **kw}
                jobs.append((launch, variant, const, cfg.num_warps, kw["BLOCK_N"] * 128))
    jobs = list({json.dumps([j[0], j[1], j[2], j[3]]): j for j in jobs}.values())  # K_BLOCKS variants coincide
    if "dequantize" in launches:
        jobs.append(("dequantize", "dequantize", {"G": 128, "BLOCK_N": bcq.DEQUANT_BLOCK_N}, 4,
                     bcq.DEQUANT_BLOCK_N * 128))
    if "mma" in launches:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        for bm in bcq_mma.BLOCK_M:
            for cfg in bcq_mma._prune(bcq_mma._configs(), {"NB": 1}, G=128, BLOCK_M_=bm):
                const = {"G": 128, "HAS_BIAS": False, "FIRST_ASM": bcq_mma.ASM[dtype, True],
                         "NEXT_ASM": bcq_mma.ASM[dtype, False], "BLOCK_M_": bm, **cfg.kwargs}
                jobs.append(("mma", "mma", const, cfg.num_warps, cfg.kwargs["BLOCK_N"] * 128))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for launch, variant, const, warps, weights in tqdm(jobs, desc="compiling", unit="kernel"):
            if launch == "dequantize":
                fn = bcq._dequant_kernel
                sig = {"planes_ptr": "*i32", "ar_ptr": "*fp16", "ac_ptr": "*fp16", "pp_ptr": "*i32",
                       "wt_ptr": "*" + args.dtype, "N": "i32"}
            elif launch == "mma":  # alpha_c_pairs is in x's dtype; no M_BUCKET
                fn = bcq_mma._bcq_mma_kernel
                sig = {"x_ptr": "*" + args.dtype, "planes_ptr": "*i32", "ar_ptr": "*fp16", "acp_ptr": "*" + args.dtype,
                       "pp_ptr": "*i32", "bias_ptr": "*fp16", "y_ptr": "*fp32", "M": "i32", "N": "i32", "NB": "i32",
                       "stride_xm": "i32"}
            else:
                fn, sig = bcq._bcq_kernel, ptr
            sass, usage = compile_one(fn, sig, const, warps, args.arch, tools, Path(tmp), gluon=launch == "mma")
            tile = {k: const[k] for k in ("BLOCK_M", "BLOCK_N") if k in const}
            if launch == "mma":
                tile = {"BLOCK_M": const["BLOCK_M_"], "BLOCK_N": const["BLOCK_N"]}
                counts = per_weight_block(sass, PLANES - 1, warps, weights)  # the first plane is outside the loop
            else:
                counts = per_weight(sass, 128 // 32, PLANES - (variant in PEELED), warps, weights)
            rows.append({"launch": launch, "variant": variant, **tile, "num_warps": warps, **usage, **counts})
    env = environment(torch.device("cpu"))  # where it was compiled; the target is settings.arch
    record = {"benchmark": "sass_count", "environment": env,
              "settings": {"arch": args.arch, "activations": args.dtype, "launches": launches, "G": 128,
                           "planes_per_block": PLANES, "k_blocks_per_program": 1, "peeled": list(PEELED) + ["mma"],
                           "h100_warp_instructions_per_s": H100_ISSUE},
              "rows": rows}
    result_path(out, ".json").write_text(json.dumps(record, indent=1) + "\n")
    for r in sorted(rows, key=lambda r: (r["launch"], r["variant"], r["warp_instructions_per_weight"])):
        tile = f"BLOCK_M {r.get('BLOCK_M', '-'):>3} BLOCK_N {r.get('BLOCK_N', '-'):>3}"
        print(f"{r['launch']:10} {r['variant']:10} {tile} warps {r['num_warps']}: "
              f"{r['warp_instructions_per_weight']:.3f} per weight ({r['h100_issue_us_4096x4096']:5.1f} µs), "
              f"{r['registers']} registers, {r['stack_bytes']} bytes of stack")
    print(f"wrote {result_path(out, '.json')}")


if __name__ == "__main__":
    run_main(main)
