"""One denoising decision over the masked positions of a block: propose tokens, score, select.

Everything runs in float64, as LLaDA's reference does, so that ties and near-ties resolve the same.
"""
from __future__ import annotations

import torch
from torch import Tensor


def outside_nucleus(logits: Tensor, top_p: float) -> Tensor:
    """True for tokens outside the smallest set whose probability reaches top_p (top-1 always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    p = sorted_logits.softmax(-1)
    drop = p.cumsum(-1) - p >= top_p  # the mass before this token already reaches top_p
    return drop.scatter(-1, order, drop)


def propose(logits: Tensor, temperature: float, top_p: float, remasking: str,
            gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Candidate tokens x0 [n] and their confidence [n] (higher commits first) from logits [n, V]."""
    logits = logits.double()
    if top_p < 1:  # the nucleus of the distribution actually sampled, softmax(logits / T)
        tempered = logits / temperature if temperature > 0 else logits
        logits = logits.masked_fill(outside_nucleus(tempered, top_p), float("-inf"))
    if temperature > 0:  # Gumbel-max: argmax(exp(l) / (-log u)^T), taken in log space
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen)
        x0 = (logits - temperature * torch.log(-torch.log(u))).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking in ("random", "origin"):
        return x0, torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=gen)
    p = logits.softmax(-1)
    if remasking == "low_confidence":
        conf = p.gather(-1, x0[:, None])[:, 0]
    elif remasking == "margin":
        top2 = p.topk(2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    else:  # entropy: Dream scores by negative entropy, with its epsilon
        conf = (p * torch.log(p + 1e-10)).sum(-1)
    return x0, conf


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
    if alg_temp > 0:  # Dream: sample positions without replacement
        return torch.multinomial((conf / alg_temp).softmax(-1), count, replacement=False, generator=gen)
    return conf.topk(count).indices


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
