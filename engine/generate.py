"""The reference semi-autoregressive block denoiser for one request.

With cache="none" and temperature 0 it reproduces LLaDA's `generate()` token for token; with
block_length >= max_tokens and the timestep schedule it is Dream's `diffusion_generate`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .kv_cache import KVCache
from .model import DiffusionLM
from .remasking import propose, select
from .sampling import SamplingParams
from .schedule import commit_count, commit_probability, split_steps

DEFAULT_SCHEDULE = {"llada": "linear", "dream": "timestep"}


@dataclass
class Generation:
    canvas: list[int]  # every generated position (the whole canvas unless it stopped early)
    nfe: int  # network evaluations spent; a CFG step counts two


def block_layout(params: SamplingParams) -> tuple[int, int]:
    """(block length, number of blocks): the canvas is max_tokens rounded up to whole blocks, and a
    block longer than max_tokens shrinks to it (one global block, as Dream decodes)."""
    block = min(params.block_length, params.max_tokens)
    return block, math.ceil(params.max_tokens / block)


class _Forward:
    """Block logits for one canvas under a cache policy, counting network evaluations."""

    def __init__(self, model: DiffusionLM, x: Tensor, prompt_len: int, params: SamplingParams):
        self.model, self.x, self.params = model, x, params
        self.rows = 2 if params.cfg_scale > 0 else 1
        self.prompt_len = prompt_len
        self.shift = int(model.config.shift_logits)  # Dream reads position i from hidden state i-1
        self.cache = None if params.cache == "none" else KVCache(
            model.config, self.rows, x.shape[0], x.device, model.embed.weight.dtype)
        self.nfe = 0

    def __call__(self, start: int, end: int, refresh: bool) -> Tensor:
        """Logits [end - start, V] for the block; `refresh` re-runs the whole canvas into the cache."""
        x = self.x[None]
        if self.rows == 2:  # the unconditional row masks the prompt
            uncond = x.clone()
            uncond[:, : self.prompt_len] = self.model.config.mask_token_id
            x = torch.cat([x, uncond])
        lo, hi = 0, x.shape[1]
        if self.cache is not None and not refresh:
            lo = max(start - self.shift, 0)
            hi = end if self.params.cache == "dual" else hi
        positions = torch.arange(lo, hi, device=x.device).expand(self.rows, -1)
        want = torch.arange(start - lo, end - lo, device=x.device).expand(self.rows, -1)
        logits = self.model(x[:, lo:hi], positions=positions, cache=self.cache, logits_at=want)
        self.nfe += self.rows
        if self.rows == 1:
            return logits[0]
        cond, uncond = logits.float()
        return uncond + (self.params.cfg_scale + 1) * (cond - uncond)


@torch.inference_mode()
def denoise(model: DiffusionLM, prompt: list[int], params: SamplingParams, eos_ids: frozenset[int],
            should_stop: Callable[[list[int]], bool] | None = None) -> Generation:
    """Decode the canvas block by block, left to right.

    Generation ends early after a finished block that holds an EOS token (unless ignore_eos), or when
    `should_stop` (given the generated tokens so far) says so: committed tokens never change, so later
    blocks could not change the returned text.
    """
    cfg = model.config
    device = model.embed.weight.device
    mask, P = cfg.mask_token_id, len(prompt)
    block, n_blocks = block_layout(params)
    length = block * n_blocks
    if P + length > cfg.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) plus canvas ({length}) exceeds the model's context "
                         f"of {cfg.max_seq_len} tokens")
    x = torch.full((P + length,), mask, dtype=torch.long, device=device)
    x[:P] = torch.tensor(prompt, dtype=torch.long, device=device)
    gen = torch.Generator(device)
    gen.manual_seed(params.seed) if params.seed is not None else gen.seed()
    schedule = params.schedule or DEFAULT_SCHEDULE[cfg.family]
    forward = _Forward(model, x, P, params)

    for b, steps in enumerate(split_steps(params.steps or length, n_blocks)):
        start, end = P + b * block, P + (b + 1) * block
        n_start, refresh = int((x[start:end] == mask).sum()), True
        # A committed token can itself be the mask id (neither reference forbids it), so a block ends
        # when no masks remain or its step budget is spent; with a threshold, one step per position.
        for step in range(steps if params.threshold is None else block):
            masked = (x[start:end] == mask).nonzero()[:, 0]
            if masked.numel() == 0:
                break
            count = 0
            if params.threshold is None:
                count = commit_count(schedule, step, steps, n_start, masked.numel())
                if count == 0 and params.remasking != "origin":
                    continue  # nothing to commit: a forward would change nothing
            x0, conf = propose(forward(start, end, refresh)[masked], params.temperature, params.top_p,
                               params.remasking, gen)
            refresh = False
            if params.remasking == "origin" and params.threshold is None:
                p = commit_probability(schedule, step, steps, n_start, masked.numel())
                chosen = (torch.rand(masked.shape, device=device, generator=gen) < p).nonzero()[:, 0]
            else:
                chosen = select(conf, count, params.threshold, params.alg_temp, gen)
            x[start + masked[chosen]] = x0[chosen]
        generated = x[P:end].tolist()
        ended = not params.ignore_eos and eos_ids.intersection(generated[-block:])
        if ended or (should_stop is not None and should_stop(generated)):
            return Generation(generated, forward.nfe)
    return Generation(x[P:].tolist(), forward.nfe)
