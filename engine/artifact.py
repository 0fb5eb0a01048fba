"""Reading a packed qdllm artifact (format 1) into the native model, refusing bad input in one line.

An artifact is an HF-layout folder (config.json, tokenizer files, safetensors shards) plus `qdllm.json`.
A quantized linear `X.weight` of the source is stored as `X.planes`, `X.alpha_r`, `X.alpha_c` and
`X.plane_ptr` (kernels/pack.py); a linear kept dense keeps `X.weight`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from qdllm.kernels.pack import BCQWeight
from qdllm.kernels.reference import dequantize

from . import models
from .errors import CheckpointError
from .loader import check_layer_count, empty_model, load_state, plain_file_name, read_config, shard_files
from .model import DiffusionLM
from .quant_linear import QuantLinear

MANIFEST = "qdllm.json"
FORMAT_VERSION = 1
PACKED = ("planes", "alpha_r", "alpha_c", "plane_ptr")


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path, verify: bool = True) -> dict:
    """The manifest, after checking its version and every shard's sha256."""
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
        assert isinstance(manifest, dict)
    except (OSError, ValueError, AssertionError):
        raise CheckpointError(f"{file}: unreadable (expected the JSON manifest of a qdllm artifact)") from None
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # not 1.0 or true, which equal 1 in Python
        raise CheckpointError(f"{file}: unknown format_version {version!r} (this qdllm reads {FORMAT_VERSION}; "
                              "convert the checkpoint again with this version)")
    shards = manifest.get("shards")
    if not isinstance(shards, dict) or not shards or not all(map(plain_file_name, shards)):
        raise CheckpointError(f"{file}: field 'shards' must map shard file names to sha256 digests")
    if verify:
        for name, digest in shards.items():
            shard = path / name
            if not shard.is_file():
                raise CheckpointError(f"{shard}: missing (listed in {MANIFEST})")
            if sha256_file(shard) != digest:
                raise CheckpointError(f"{shard}: sha256 does not match {MANIFEST} (the file is corrupt or was "
                                      "changed)")
        check_config(path, manifest)
    quantization = manifest.get("quantization")
    block_size = quantization.get("block_size") if isinstance(quantization, dict) else None
    if type(block_size) is not int or block_size <= 0 or block_size % 32:
        raise CheckpointError(f"{file}: field 'quantization.block_size' must be a positive multiple of 32, "
                              f"got {block_size!r}")
    return manifest


def check_config(path: Path, manifest: dict) -> None:
    """config.json must be the one the artifact was converted from: the shards' shapes, and so the model, are
    read from it, and an edited head count or RoPE base would load and compute other logits without a word."""
    source = manifest.get("source")
    digest = source.get("config_sha256") if isinstance(source, dict) else None
    if not isinstance(digest, str):
        raise CheckpointError(f"{path / MANIFEST}: field 'source.config_sha256' must be the sha256 of config.json")
    config = path / "config.json"
    if config.is_file() and sha256_file(config) != digest:
        raise CheckpointError(f"{config}: sha256 does not match {MANIFEST}'s source.config_sha256 (the file was "
                              "changed after conversion)")


def check_no_extra(where: dict[str, Path], expected: set[str]) -> None:
    """Every tensor of an artifact's shards is read: one that the model does not take means a damaged or
    hand-edited shard, whose weights would otherwise be dropped without a word."""
    extra = sorted(where.keys() - expected)
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: unexpected tensor '{extra[0]}' (no part of the model in "
                              "config.json takes it)")


def _tensor(where: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(where[name]), framework="pt") as f:
        return f.get_tensor(name)


def packed_linear(where: dict[str, Path], prefix: str, in_features: int, out_features: int, block_size: int,
                  bias: torch.Tensor | None) -> BCQWeight:
    """The packed weight stored under `prefix` (e.g. `model.transformer.blocks.0.q_proj.`), checked."""
    missing = [prefix + p for p in PACKED if prefix + p not in where]
    if missing:
        folder = next(iter(where.values())).parent
        raise CheckpointError(f"{folder}: missing tensor '{missing[0]}'")
    t = {p: _tensor(where, prefix + p) for p in PACKED}
    try:
        w = BCQWeight(**t, in_features=in_features, block_size=block_size, bias=bias)
    except ValueError as e:
        raise CheckpointError(f"{where[prefix + 'planes']}: {prefix}{e}") from None
    if w.out_features != out_features:
        raise CheckpointError(f"{where[prefix + 'alpha_r']}: tensor '{prefix}alpha_r' has {w.out_features} rows, "
                              f"expected {out_features}")
    return w


def load_artifact(path: Path, device: str | torch.device, dtype: torch.dtype | None, backend: str) -> DiffusionLM:
    """The native model with QuantLinear modules for packed linears and dense ones elsewhere; with backend "dense",
    the packed linears stay nn.Linear, their weights dequantized as the torch backend does on every call."""
    manifest = read_manifest(path)
    cfg = read_config(path)
    block_size = manifest["quantization"]["block_size"]
    dtype = dtype or cfg.torch_dtype or torch.float16
    family = models.FAMILIES[cfg.family]
    where = shard_files(path, [path / name for name in manifest["shards"]])  # only the shards the hashes cover
    model = empty_model(cfg, path)
    check_layer_count(path, cfg, where)
    packed: dict[str, tuple[str, torch.nn.Linear]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith("layers."):
            continue
        prefix = models.checkpoint_name(family, f"{name}.weight").removesuffix("weight")
        if prefix + "planes" in where or prefix + "weight" not in where:
            packed[name] = (prefix, module)
    shapes = {n: p.shape for n, p in model.state_dict().items()
              if not (n.endswith(".weight") and n.removesuffix(".weight") in packed)}
    check_no_extra(where, {models.checkpoint_name(family, n) for n in shapes}
                   | {prefix + p for prefix, _ in packed.values() for p in PACKED})
    state = load_state(path, cfg, shapes, dtype, device, where)
    model.load_state_dict(state, assign=True, strict=False)
    for name, (prefix, module) in packed.items():
        bias = state.get(f"{name}.bias")
        w = packed_linear(where, prefix, module.in_features, module.out_features, block_size, bias)
        if backend == "dense":
            module.weight = torch.nn.Parameter(dequantize(w.to(device), dtype), requires_grad=False)
            continue
        parent, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), attr, QuantLinear(w.to(device), backend))
    return model.eval().requires_grad_(False)
