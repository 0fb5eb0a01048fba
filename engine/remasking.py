"""One denoising decision over the masked positions of a block: propose tokens, score, select.

Proposals run on the model's device for every request of a forward call at once, and reach the host in one
transfer; selection runs on the host, on a few numbers per request. So a forward call's requests wait on the
device once, however many they are. Everything runs in float64, as LLaDA's reference does, so that ties and
near-ties resolve the same.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .sampling import SamplingParams

# float64 logits proposed at once: a step's requests are split into calls below this (one request alone may
# pass it), so batching does not multiply the memory that one request's proposal takes.
CHUNK_ELEMENTS = 1 << 24
SCORED = ("low_confidence", "margin", "entropy")  # the policies whose confidence comes from the model
Proposal = tuple[Tensor, Tensor]  # candidate tokens x0 [n] and their confidence [n]


def outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """True for tokens outside the smallest set whose probability reaches top_p (top-1 always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    p = sorted_logits.softmax(-1)
    drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
    return drop.scatter(-1, order, drop)


def propose(rows: list[Tensor], params: list[SamplingParams], gens: list[torch.Generator]) -> list[Proposal]:
    """Candidate tokens x0 [n_i] and their confidence [n_i] (higher commits first), on the host, from each
    request's masked logits rows[i] [n_i, V]. Requests with random or origin remasking draw their confidence
    themselves (it needs no model output), so theirs is left at 0."""
    chunks, size = [[]], 0
    for i, r in enumerate(rows):
        if chunks[-1] and size + r.numel() > CHUNK_ELEMENTS:
            chunks.append([])
            size = 0
        chunks[-1].append(i)
        size += r.numel()
    x0, conf = zip(*(_propose_chunk(rows, params, gens, chunk) for chunk in chunks))
    # one transfer, so one wait on the device (token ids are exact in float64)
    x0, conf = torch.stack((torch.cat(x0).double(), torch.cat(conf))).cpu()
    x0 = x0.long()
    sizes = [len(r) for r in rows]
    return list(zip(x0.split(sizes), conf.split(sizes)))


def _propose_chunk(rows: list[Tensor], params: list[SamplingParams], gens: list[torch.Generator],
                   chunk: list[int]) -> Proposal:
    """x0 and confidence, on the device, for the requests `chunk` in one set of batched calls; per-request work
    only where a request's own settings or generator need it."""
    spans, lo = [], 0
    for i in chunk:
        spans.append(slice(lo, lo + len(rows[i])))
        lo += len(rows[i])
    logits = torch.empty(lo, rows[chunk[0]].shape[-1], dtype=torch.float64, device=rows[chunk[0]].device)
    torch.cat([rows[i] for i in chunk], out=logits)  # converted to float64 as it is copied
    noise = None
    for i, s in zip(chunk, spans):
        p = params[i]
        if p.top_p < 1:  # the nucleus of the distribution actually sampled, softmax(logits / T)
            tempered = logits[s] / p.temperature if p.temperature > 0 else logits[s]
            logits[s] = logits[s].masked_fill(outside_nucleus(tempered, p.top_p), float("-inf"))
        if p.temperature > 0:  # Gumbel-max: argmax(exp(l) / (-log u)^T), taken in log space
            if noise is None:
                noise = torch.zeros_like(logits)
            u = torch.rand(logits[s].shape, dtype=torch.float64, device=logits.device, generator=gens[i])
            noise[s] = p.temperature * torch.log(-torch.log(u))
    x0 = (logits if noise is None else logits - noise).argmax(-1)
    conf = torch.zeros(len(logits), dtype=torch.float64, device=logits.device)
    kinds = [params[i].remasking for i in chunk]
    if any(k in SCORED for k in kinds):
        prob = logits.softmax(-1)
        if all(k == kinds[0] for k in kinds):
            conf = _score(prob, x0, kinds[0])
        else:
            for k, s in zip(kinds, spans):
                if k in SCORED:
                    conf[s] = _score(prob[s], x0[s], k)
    return x0, conf


def _score(prob: Tensor, x0: Tensor, remasking: str) -> Tensor:
    """The confidence of each row's candidate under one of the SCORED policies."""
    if remasking == "low_confidence":
        return prob.gather(-1, x0[:, None])[:, 0]
    if remasking == "margin":
        top2 = prob.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    return (prob * torch.log(prob + 1e-10)).sum(-1)  # entropy: Dream scores by negative entropy, with its epsilon


def select(conf: Tensor, count: int, threshold: float | None, factor: float | None, alg_temp: float,
           gen: torch.Generator) -> Tensor:
    """Indices into `conf` to commit this step."""
    if threshold is not None:  # Fast-dLLM: the most confident always, plus all that reach the threshold
        order = conf.argsort(descending=True)
        keep = conf[order] >= threshold
        keep[0] = True
        return order[keep]
    if factor is not None:
        return order_by_factor(conf, factor)
    if alg_temp > 0:
        return sample_positions(conf, count, alg_temp, gen)
    return conf.topk(count).indices


def sample_positions(conf: Tensor, count: int, alg_temp: float, gen: torch.Generator) -> Tensor:
    """Dream's draw of `count` positions without replacement from softmax(conf / alg_temp), made as its reference
    makes it. A small alg_temp can leave fewer nonzero probabilities than `count`; torch then fills the draw with
    positions of probability 0, in no order of confidence. Here the rest are drawn the same way from the positions
    left, whose softmax no longer underflows."""
    logits, left, chosen = conf / alg_temp, torch.arange(len(conf), device=conf.device), []
    while count > 0:
        p = logits[left].softmax(-1)
        pick = torch.multinomial(p, min(count, int(torch.count_nonzero(p))), replacement=False, generator=gen)
        chosen.append(left[pick])
        count -= len(pick)
        keep = torch.ones(len(left), dtype=torch.bool, device=conf.device)
        keep[pick] = False
        left = left[keep]
    return torch.cat(chosen)


def order_by_factor(conf: Tensor, factor: float) -> Tensor:
    """Fast-dLLM's dynamic rule: the n-th most confident (n = 1, 2, ...) is committed while its confidence is at
    least 1 - factor / (n + 1), the first against -1; at least one is committed, and all of them when only the
    last falls short (the reference's count after its loop)."""
    order = conf.argsort(descending=True)
    n = torch.arange(1, len(conf) + 1, dtype=torch.float64, device=conf.device)
    need = 1 - factor / (n + 1)
    need[0] = -1.0
    k = int((conf[order] >= need).cumprod(0).sum())  # the leading run that meets its bound
    if k == 0 or k == len(conf) - 1:
        k += 1
    return order[:k]
