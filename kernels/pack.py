"""The packed BCQ weight of artifact format 1, and exact bit packing of its sign planes.

A block b of W [N, K] (G input columns) is Σ_p (alpha_r[p] ⊗ alpha_c[p]) ⊙ B_p over its planes
plane_ptr[b]:plane_ptr[b+1], with B_p ∈ {−1, +1}^{N×G} stored as int32 words packed along K.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_ORDER = 3


@dataclass(frozen=True, eq=False)
class BCQWeight:
    """A packed linear weight; construction validates every tensor (see `validate`).

    eq=False keeps identity hashing, so caches may key on the object.
    """

    planes: Tensor  # int32 [P, G/32, N]; bit j of word w is the sign of column 32w+j, 1 meaning +1
    alpha_r: Tensor  # fp16 [P, N]
    alpha_c: Tensor  # fp16 [P, G]
    plane_ptr: Tensor  # int32 [nb+1], CSR offsets of each block's planes
    in_features: int
    block_size: int = 128
    bias: Tensor | None = None  # [N], any float dtype

    def __post_init__(self) -> None:
        validate(self)

    @property
    def out_features(self) -> int:
        return self.alpha_r.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.in_features // self.block_size

    @property
    def num_planes(self) -> int:
        return self.planes.shape[0]

    @property
    def orders(self) -> Tensor:
        """Planes per block, int32 [nb]."""
        return torch.diff(self.plane_ptr)

    @property
    def effective_bits(self) -> float:
        """Every stored bit (planes, both scales, plane_ptr, bias) per weight."""
        tensors = [self.planes, self.alpha_r, self.alpha_c, self.plane_ptr]
        if self.bias is not None:
            tensors.append(self.bias)
        bits = sum(t.numel() * t.element_size() * 8 for t in tensors)
        return bits / (self.out_features * self.in_features)

    def to(self, device: torch.device | str) -> BCQWeight:
        return dataclasses.replace(
            self, planes=self.planes.to(device), alpha_r=self.alpha_r.to(device), alpha_c=self.alpha_c.to(device),
            plane_ptr=self.plane_ptr.to(device), bias=None if self.bias is None else self.bias.to(device))


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _expect(name: str, t: Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        want = f"{str(dtype).removeprefix('torch.')} {list(shape)}"
        raise ValueError(f"{name}: expected {want}, got {_describe(t)}")


def validate(w: BCQWeight) -> None:
    """Raise ValueError with one line naming the tensor and what was expected.

    Reads plane_ptr on the host: call at load time, never in a hot path.
    """
    k, g = w.in_features, w.block_size
    if g <= 0 or g % 32:
        raise ValueError(f"block_size: expected a positive multiple of 32, got {g}")
    if k <= 0 or k % g:
        raise ValueError(f"in_features: expected a positive multiple of block_size {g}, got {k}")
    if w.planes.dim() != 3:
        raise ValueError(f"planes: expected int32 [P, {g // 32}, N], got {_describe(w.planes)}")
    p, n, nb = w.planes.shape[0], w.planes.shape[2], k // g
    _expect("planes", w.planes, torch.int32, (p, g // 32, n))
    _expect("alpha_r", w.alpha_r, torch.float16, (p, n))
    _expect("alpha_c", w.alpha_c, torch.float16, (p, g))
    _expect("plane_ptr", w.plane_ptr, torch.int32, (nb + 1,))
    if w.bias is not None and (not w.bias.is_floating_point() or tuple(w.bias.shape) != (n,)):
        raise ValueError(f"bias: expected a float [{n}], got {_describe(w.bias)}")
    tensors = [w.planes, w.alpha_r, w.alpha_c, w.plane_ptr] + ([] if w.bias is None else [w.bias])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"planes, alpha_r, alpha_c, plane_ptr, bias: expected one device, got "
                         f"{sorted({str(t.device) for t in tensors})}")
    ptr = w.plane_ptr.tolist()
    if ptr[0] != 0 or ptr[-1] != p:
        raise ValueError(f"plane_ptr: expected to run from 0 to P={p}, got {ptr[0]}..{ptr[-1]}")
    orders = [b - a for a, b in zip(ptr, ptr[1:])]
    bad = next((i for i, o in enumerate(orders) if not 1 <= o <= MAX_ORDER), None)
    if bad is not None:
        raise ValueError(f"plane_ptr: block {bad} has order {orders[bad]}, expected 1..{MAX_ORDER}")


def pack_signs(signs: Tensor) -> Tensor:
    """bool [P, N, G] (True = +1) -> int32 [P, G/32, N], exact including bit 31."""
    if signs.dtype != torch.bool or signs.dim() != 3 or signs.shape[2] % 32:
        raise ValueError(f"signs: expected bool [P, N, G] with G a multiple of 32, got {_describe(signs)}")
    p, n, g = signs.shape
    bits = signs.reshape(p, n, g // 32, 32)
    words = torch.zeros(p, n, g // 32, dtype=torch.int64, device=signs.device)
    for j in range(32):  # one bit at a time keeps the int64 temporaries at 1/32 of the signs
        words |= bits[..., j].to(torch.int64) << j  # words stay in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's-complement wraparound into int32
    return words.to(torch.int32).permute(0, 2, 1).contiguous()


def unpack_signs(planes: Tensor) -> Tensor:
    """int32 [P, G/32, N] -> bool [P, N, G], the inverse of `pack_signs`."""
    if planes.dtype != torch.int32 or planes.dim() != 3:
        raise ValueError(f"planes: expected int32 [P, G/32, N], got {_describe(planes)}")
    p, words, n = planes.shape
    shifts = torch.arange(32, dtype=torch.int32, device=planes.device)
    bits = (planes.permute(0, 2, 1)[..., None] >> shifts) & 1  # arithmetic shift: bit 31 still lands in bit 0
    return bits.reshape(p, n, words * 32).bool()


def pack(codes: Sequence[tuple[Tensor, Tensor, Tensor]], bias: Tensor | None = None) -> BCQWeight:
    """Build a BCQWeight from per-block codes (signs bool [o, N, G], alpha_r [o, N], alpha_c [o, G]),
    in block order."""
    if not codes:
        raise ValueError("codes: expected at least one block")
    n, g = codes[0][0].shape[1:]
    for b, (signs, a_r, a_c) in enumerate(codes):
        o = signs.shape[0]
        if signs.dim() != 3 or tuple(signs.shape[1:]) != (n, g):
            raise ValueError(f"codes[{b}] signs: expected [o, {n}, {g}], got {_describe(signs)}")
        if tuple(a_r.shape) != (o, n) or tuple(a_c.shape) != (o, g):
            raise ValueError(f"codes[{b}] scales: expected alpha_r [{o}, {n}] and alpha_c [{o}, {g}], "
                             f"got {list(a_r.shape)} and {list(a_c.shape)}")
    orders = torch.tensor([0] + [c[0].shape[0] for c in codes])
    return BCQWeight(
        planes=pack_signs(torch.cat([c[0] for c in codes])),
        alpha_r=torch.cat([c[1] for c in codes]).to(torch.float16),
        alpha_c=torch.cat([c[2] for c in codes]).to(torch.float16),
        plane_ptr=orders.cumsum(0).to(device=codes[0][0].device, dtype=torch.int32),
        in_features=g * len(codes), block_size=g, bias=bias)
