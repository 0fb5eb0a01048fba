"""Load a Hugging Face dLLM checkpoint directory into the native model, refusing bad input in one line."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from qdllm.kernels import dispatch

from . import models
from .config import Fields, ModelConfig
from .errors import CheckpointError
from .model import DiffusionLM

# The kernels' backends, plus "dense": an artifact's packed linears dequantized once at load into plain nn.Linear
# weights, for speed where memory is not short (a CPU has no low-bit kernel, so "torch" dequantizes every call).
BACKENDS = (*dispatch.BACKENDS, "dense")
INDEX = "model.safetensors.index.json"


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """The device to run on: the one asked for, checked to exist, else CUDA when present, else the CPU. `name`:
    what errors call the setting (a CLI's flag)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{name} {device!r} is not available on this machine")
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"{name} must be cpu, cuda or cuda:N, got {device!r}")
    return dev


def model_path(path: object) -> Path:
    """The folder argument of the Python API as a Path; anything else is refused by name (Path() would say only
    "expected str, bytes or os.PathLike object")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint or artifact folder (a str or Path), got {path!r}")
    return Path(path)


def check_dir(path: Path, expected: str) -> None:
    """Refuse a model path that is missing or not a folder, saying which, and what is `expected` there."""
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "not found"
        raise CheckpointError(f"{path}: {problem} (expected {expected})")


def read_config(path: str | Path) -> ModelConfig:
    """Parse a checkpoint directory's config.json."""
    file = Path(path) / "config.json"
    if Path(path).is_file():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (expected a Hugging Face checkpoint directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise CheckpointError(f"{file}: unreadable (nested too deeply)") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    family = models.by_model_type(raw.get("model_type"))
    if family is None:
        known = sorted(f.MODEL_TYPE for f in models.FAMILIES.values())
        raise CheckpointError(f"{file}: unknown model_type {raw.get('model_type')!r} (expected one of {known})")
    return family.parse_config(Fields(raw, str(file)))


def shard_files(path: Path, files: list[Path] | None = None) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it: from the sharded index, else from
    `files` (an artifact's manifest lists its shards), else from every *.safetensors in the folder."""
    index = path / INDEX
    if files is None and index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: unreadable (expected JSON with a 'weight_map' object)") from None
        for name, file in weight_map.items():
            if not plain_file_name(file):
                raise CheckpointError(f"{index}: weight_map['{name}'] must name a file in {path}, got {file!r}")
        return {name: path / file for name, file in weight_map.items()}
    files = sorted(path.glob("*.safetensors")) if files is None else files
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (and no {INDEX})")
    names: dict[str, Path] = {}
    for file in files:
        for name in _open(file).keys():
            if name in names:  # which copy is meant? Taking the last one changed a layer without a word
                raise CheckpointError(f"{file}: tensor '{name}' is also in {names[name].name}; without {INDEX} "
                                      "to choose, each tensor must be in one file")
            names[name] = file
    return names


def plain_file_name(name: object) -> bool:
    """Shards are named by index files and manifests; they must lie in the checkpoint's own folder."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def check_layer_count(path: Path, cfg: ModelConfig, where: dict[str, Path]) -> None:
    """The weights must hold config.json's count of layers: layers beyond it would be dropped silently, and a
    checkpoint short of it would stop a conversion hours in, at the first missing layer."""
    prefix = models.FAMILIES[cfg.family].LAYER_PREFIX.split("{")[0]
    held = 0
    for name, file in where.items():
        index = name.removeprefix(prefix).split(".")[0]
        if name.startswith(prefix) and index.isdigit():
            if int(index) >= cfg.n_layers:
                raise CheckpointError(f"{file}: holds '{name}', but {path / 'config.json'} declares only "
                                      f"{cfg.n_layers} layer(s)")
            held = max(held, int(index) + 1)
    if held < cfg.n_layers:
        raise CheckpointError(f"{path}: holds the weights of {held} layer(s), but {path / 'config.json'} declares "
                              f"{cfg.n_layers}")


def empty_model(cfg: ModelConfig, path: Path) -> DiffusionLM:
    """The model on the meta device; sizes too large for torch are refused like any other bad field."""
    try:
        with torch.device("meta"):
            return DiffusionLM(cfg)
    except (RuntimeError, OverflowError, TypeError) as e:  # TypeError: a size beyond int64
        raise CheckpointError(f"{path / 'config.json'}: sizes too large to build the model "
                              f"({str(e).splitlines()[0]})") from None


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (named by {INDEX})") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def check_tensors(path: Path, cfg: ModelConfig, shapes: dict[str, torch.Size],
                  where: dict[str, Path] | None = None) -> dict[Path, list[tuple[str, str]]]:
    """Check the presence, shape and kind of the native tensors named in `shapes` from the safetensors headers
    alone, before any long work; returns them by file, as (native, checkpoint) names."""
    family = models.FAMILIES[cfg.family]
    where = shard_files(path) if where is None else where
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for native, shape in shapes.items():
        ckpt = models.checkpoint_name(family, native)
        if ckpt not in where:
            raise CheckpointError(f"{path}: missing tensor '{ckpt}' (expected shape {list(shape)})")
        by_file.setdefault(where[ckpt], []).append((native, ckpt))
    for file, names in by_file.items():
        handle = _open(file)
        held = set(handle.keys())
        for native, ckpt in names:
            if ckpt not in held:  # the index named the wrong shard
                raise CheckpointError(f"{file}: has no tensor '{ckpt}' (named by {INDEX})")
            header = handle.get_slice(ckpt)
            if header.get_shape() != list(shapes[native]):
                raise CheckpointError(f"{file}: tensor '{ckpt}' has shape {header.get_shape()}, expected "
                                      f"{list(shapes[native])}")
            if not header.get_dtype().startswith(("F", "BF")):  # F16, BF16, F32, F64, F8_E4M3, ...
                raise CheckpointError(f"{file}: tensor '{ckpt}' has dtype {header.get_dtype()}, expected a "
                                      "floating-point dtype")
    return by_file


def load_state(path: Path, cfg: ModelConfig, shapes: dict[str, torch.Size], dtype: torch.dtype,
               device: str | torch.device, where: dict[str, Path] | None = None,
               finite: bool = False) -> dict[str, torch.Tensor]:
    """Read the native tensors named in `shapes` from the checkpoint (from the files of `where`, when given),
    checked by `check_tensors`; with `finite`, NaN and inf are refused too (the quantizer's calibration would
    spread them through every later layer)."""
    state = {}
    for file, names in check_tensors(path, cfg, shapes, where).items():
        handle = _open(file)
        for native, ckpt in names:
            t = handle.get_tensor(ckpt)
            # fp8 has no isfinite kernel; every fp8 value is finite or NaN in fp16 too
            if finite and not torch.isfinite(t.half() if t.element_size() == 1 else t).all():
                raise CheckpointError(f"{file}: tensor '{ckpt}' holds NaN or inf")
            state[native] = t.to(device=device, dtype=dtype)
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               backend: str = "auto") -> DiffusionLM:
    """Build the native model for an HF checkpoint directory or a qdllm artifact; `model(input_ids)` returns
    logits [B, L, V]. `backend` picks the kernels of packed linears and of every layer's elementwise steps."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    device = resolve_device("cpu" if device is None else device)  # else torch fails deep inside, naming no argument
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    path = model_path(path)
    check_dir(path, "a Hugging Face checkpoint directory")
    if (path / "qdllm.json").exists():
        from .artifact import load_artifact  # the artifact reader builds on this module
        model = load_artifact(path, device, dtype, backend)
    else:
        cfg = read_config(path)
        model = empty_model(cfg, path)
        where = shard_files(path)
        check_layer_count(path, cfg, where)
        shapes = {name: p.shape for name, p in model.state_dict().items()}
        state = load_state(path, cfg, shapes, dtype or cfg.torch_dtype or torch.float32, device, where)
        model.load_state_dict(state, assign=True)
    model.backend = "auto" if backend == "dense" else backend
    if backend == "triton":  # refused now, not at the first forward (a server would fail every request)
        why = dispatch.triton_unusable(torch.empty(0, device=device, dtype=model.embed.weight.dtype))
        if why:
            raise ValueError(f"backend 'triton' cannot run here: {why}")
    return model.eval().requires_grad_(False)
