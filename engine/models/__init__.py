"""Model families: each maps its checkpoint's config.json and tensor names onto the shared decoder."""
from __future__ import annotations

from types import ModuleType

from . import dream, llada

FAMILIES: dict[str, ModuleType] = {"llada": llada, "dream": dream}


def by_model_type(model_type: object) -> ModuleType | None:
    """The family whose config.json `model_type` this is (LLaDA: "llada", Dream: "Dream")."""
    return next((f for f in FAMILIES.values() if f.MODEL_TYPE == model_type), None)


def checkpoint_name(family: ModuleType, native: str) -> str:
    """Native parameter name -> the checkpoint's own, e.g. LLaDA `layers.3.o_proj.weight` ->
    `model.transformer.blocks.3.attn_out.weight`."""
    parts = native.split(".")
    if parts[0] == "layers":
        return family.LAYER_PREFIX.format(i=parts[1]) + f"{family.LAYER[parts[2]]}.{parts[3]}"
    return f"{family.GLOBAL[parts[0]]}.{parts[1]}"
