"""The layer-wise conversion: stream one decoder layer at a time onto the device, quantize its linears
group by group on calibration activations, write it, and feed the next layer its quantized outputs.

Peak device memory is one layer in fp32 plus one batch of activations; the activations of all
calibration windows stay on the CPU.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from qdllm.engine import models
from qdllm.engine.artifact import packed_linear
from qdllm.engine.config import ModelConfig
from qdllm.engine.loader import load_state, shard_files
from qdllm.engine.model import DecoderLayer, rope_tables
from qdllm.kernels.reference import dequantize

from .artifact import ArtifactWriter
from .hessian import HessianAccumulator
from .methods import Method, QuantizedLinear

# The official order within a layer; each later group is calibrated on the partly quantized layer.
GROUPS = (("o_proj",), ("down_proj",), ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class Calibration:
    """Hidden states [N, L, d] of every calibration window, on the CPU; fed to the device in batches."""

    x: Tensor
    batch: int


def _empty_layer(cfg: ModelConfig) -> DecoderLayer:
    with torch.device("meta"):
        return DecoderLayer(cfg)


def load_layer(src: Path, cfg: ModelConfig, i: int, device: torch.device) -> DecoderLayer:
    """Layer i of the source checkpoint, in fp32 on the device."""
    layer = _empty_layer(cfg)
    shapes = {f"layers.{i}.{n}": p.shape for n, p in layer.state_dict().items()}
    state = load_state(src, cfg, shapes, torch.float32, device, finite=True)
    layer.load_state_dict({n.split(".", 2)[2]: t for n, t in state.items()}, assign=True)
    return layer.eval().requires_grad_(False)


def replay_layer(out: Path, cfg: ModelConfig, i: int, block_size: int, device: torch.device) -> DecoderLayer:
    """Layer i as written to the artifact, dequantized to fp32: what a resumed run continues from."""
    family = models.FAMILIES[cfg.family]
    where = shard_files(out)
    layer = _empty_layer(cfg)
    full = {n: models.checkpoint_name(family, f"layers.{i}.{n}") for n in layer.state_dict()}
    shapes = {f"layers.{i}.{n}": p.shape for n, p in layer.state_dict().items() if full[n] in where}
    state = {n.split(".", 2)[2]: t for n, t in load_state(out, cfg, shapes, torch.float32, device).items()}
    for name in full.keys() - state.keys():  # packed linear weights
        module = layer.get_submodule(name.removesuffix(".weight"))
        w = packed_linear(where, full[name].removesuffix("weight"), module.in_features, module.out_features,
                          block_size, None)
        state[name] = dequantize(w.to(device), torch.float32)
    layer.load_state_dict(state, assign=True)
    return layer.eval().requires_grad_(False)


@torch.no_grad()
def run_layer(layer: DecoderLayer, calib: Calibration, device: torch.device) -> Tensor:
    """The layer's outputs for every calibration window, on the CPU in the activations' dtype."""
    out = torch.empty_like(calib.x)
    n, L, _ = calib.x.shape
    positions = torch.arange(L, device=device)[None]
    cos, sin = rope_tables(positions, layer.cfg.head_dim, layer.cfg.rope_theta)
    for lo in range(0, n, calib.batch):
        x = calib.x[lo:lo + calib.batch].to(device, torch.float32)
        out[lo:lo + calib.batch] = layer(x, cos, sin, None, None, 0).to("cpu", out.dtype)
    return out


def group_hessian(layer: DecoderLayer, group: tuple[str, ...], calib: Calibration,
                  device: torch.device) -> Tensor:
    """H of the input that a group of linears shares, over every calibration token, in fp32."""
    first = getattr(layer, group[0])
    acc = HessianAccumulator(first.in_features, device)
    handle = first.register_forward_pre_hook(lambda _module, args: acc.add(args[0]))
    try:
        run_layer(layer, calib, device)
    finally:
        handle.remove()
    return acc.H


def check_finite(x: Tensor, batch: int, what: str) -> None:
    """Refuse activations that overflowed the dtype they are kept in: the layer's relative error would be NaN
    and the next layer would be calibrated (or, for rtn, measured) on NaN. One check for every method; within
    a layer, a calibrated method's H check names the linear first. Batch by batch, to allocate little."""
    for lo in range(0, len(x), batch):
        if not torch.isfinite(x[lo:lo + batch]).all():
            dtype = str(x.dtype).removeprefix("torch.")
            raise ValueError(f"{what} hold NaN or inf in {dtype} on the calibration windows (overflowing "
                             f"activations); the model must compute finite activations in {dtype}")


def relative_error(out: Tensor, ref: Tensor) -> float:
    diff = (out.float() - ref.float()).square().sum()
    return (diff / ref.float().square().sum().clamp_min(1e-30)).sqrt().item()


def quantize_layer(layer: DecoderLayer, i: int, calib: Calibration, method: Method,
                   device: torch.device) -> tuple[dict[str, QuantizedLinear], Tensor, float]:
    """Quantize layer i in place, group by group; returns its linears, its quantized outputs, and their
    error relative to the full-precision layer on the same inputs."""
    reference = run_layer(layer, calib, device)
    done: dict[str, QuantizedLinear] = {}
    for group in GROUPS:
        H = group_hessian(layer, group, calib, device) if method.needs_calibration else None
        for name in group:
            linear = getattr(layer, name)
            try:
                done[name] = method.quantize(linear.weight, H)
            except ValueError as e:  # H not finite (overflowing activations) or degenerate: name the linear
                full = models.checkpoint_name(models.FAMILIES[layer.cfg.family], f"layers.{i}.{name}.weight")
                raise ValueError(f"layer {i}, '{full}': {e}") from None
            linear.weight.data = done[name].weight.to(device)
    out = run_layer(layer, calib, device)
    check_finite(reference, calib.batch, f"layer {i}: its outputs")
    check_finite(out, calib.batch, f"layer {i}: its quantized outputs")
    return done, out, relative_error(out, reference)


def layer_tensors(layer: DecoderLayer, i: int, cfg: ModelConfig, quantized: dict[str, QuantizedLinear],
                  dtype: torch.dtype) -> dict[str, Tensor]:
    """The shard of one layer: each linear's stored tensors, and its norms (and biases) in the source dtype."""
    family = models.FAMILIES[cfg.family]
    out = {}
    for name, p in layer.state_dict().items():
        module, kind = name.rsplit(".", 1)
        full = models.checkpoint_name(family, f"layers.{i}.{name}")
        if module in quantized and kind == "weight":
            prefix = full.removesuffix("weight")
            out.update({prefix + suffix: t for suffix, t in quantized[module].stored.items()})
        else:
            out[full] = p.to(dtype)
    return out


def layer_record(i: int, quantized: dict[str, QuantizedLinear], err: float, layer: DecoderLayer) -> dict:
    sizes = {n: getattr(layer, n).weight.numel() for n in quantized}
    bits = sum(q.effective_bits * sizes[n] for n, q in quantized.items()) / sum(sizes.values())
    orders = _histogram({str(o): c for o, c in q.orders.items()} for q in quantized.values())
    return {"index": i, "effective_bits": bits, "relative_error": err, "orders": orders,
            "weights": sum(sizes.values()),
            "linears": {n: {"effective_bits": q.effective_bits, "orders": {str(o): c for o, c in q.orders.items()}}
                        for n, q in quantized.items()}}


def convert(src: Path, cfg: ModelConfig, ids: Tensor, method: Method, writer: ArtifactWriter,
            device: torch.device, batch: int, dtype: torch.dtype, progress: bool = True) -> None:
    """Quantize and write every layer in order. Layers already written (--resume) are replayed from their
    shards, which rebuilds the calibration activations bit for bit."""
    family = models.FAMILIES[cfg.family]
    embed = load_state(src, cfg, {"embed.weight": torch.Size([cfg.vocab_size, cfg.d_model])}, torch.float32,
                       "cpu", finite=True)["embed.weight"]
    calib = Calibration((embed[ids] * cfg.emb_scale).to(dtype), batch)
    del embed
    check_finite(calib.x, batch, "layer 0: its inputs (the embeddings of the calibration tokens)")
    # `with` closes the bar on an error too, so that the error starts a line of its own
    with tqdm(range(cfg.n_layers), desc="qdllm-convert", unit="layer", disable=not progress) as bar:
        for i in bar:
            if i < writer.layers_done:
                calib.x = run_layer(replay_layer(writer.out, cfg, i, method.block_size, device), calib, device)
                bar.set_postfix_str("resumed from its shard")
                continue
            layer = load_layer(src, cfg, i, device)
            quantized, calib.x, err = quantize_layer(layer, i, calib, method, device)
            record = layer_record(i, quantized, err, layer)
            writer.write_layer(i, layer_tensors(layer, i, cfg, quantized, dtype), record)
            bar.set_postfix(bits=f"{record['effective_bits']:.3f}", err=f"{err:.4f}")
    globals_ = {models.checkpoint_name(family, n): t
                for n, t in load_state(src, cfg, _global_shapes(cfg), dtype, "cpu", finite=True).items()}
    writer.finish(src, globals_, summary(writer.layers))


def _global_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    shapes = {"embed.weight": torch.Size([cfg.vocab_size, cfg.d_model]), "norm.weight": torch.Size([cfg.d_model])}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = torch.Size([cfg.vocab_size, cfg.d_model])
    return shapes


def summary(layers: list[dict]) -> dict:
    """Whole-model figures over the quantized linears."""
    weights = sum(r["weights"] for r in layers)
    return {"effective_bits": sum(r["effective_bits"] * r["weights"] for r in layers) / weights,
            "quantized_weights": weights, "orders": _histogram(r["orders"] for r in layers)}


def _histogram(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Blocks per order, summed over parts, keyed by the order as a string (JSON keys)."""
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))
