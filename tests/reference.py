"""Independent references for tests: a float64 forward written from the papers' equations (RoPE as
complex rotation, explicit softmax attention), and plain re-statements of LLaDA's `generate()` and
Dream's `diffusion_generate` at temperature 0."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(str(file)).items()})
    return out


def reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """float64 logits [B, L, V]; for Dream already shifted so that position i predicts token i."""
    cfg, w = json.loads((path / "config.json").read_text()), _tensors(path)
    if cfg["model_type"] == "llada":
        d, H, layers, eps = cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["rms_norm_eps"]
        Hkv, theta = cfg["n_kv_heads"], cfg["rope_theta"]
        emb, final = w["model.transformer.wte.weight"], w["model.transformer.ln_f.weight"]
        head = emb if cfg["weight_tying"] else w["model.transformer.ff_out.weight"]
        names = lambda i: {k: f"model.transformer.blocks.{i}.{v}" for k, v in dict(  # noqa: E731
            n1="attn_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out", n2="ff_norm",
            g="ff_proj", u="up_proj", dn="ff_out").items()}
    else:
        d, H, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["rms_norm_eps"]
        layers = cfg["num_hidden_layers"]
        Hkv, theta = cfg["num_key_value_heads"], cfg["rope_theta"]
        emb, final, head = w["model.embed_tokens.weight"], w["model.norm.weight"], w["lm_head.weight"]
        names = lambda i: {k: f"model.layers.{i}.{v}" for k, v in dict(  # noqa: E731
            n1="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
            o="self_attn.o_proj", n2="post_attention_layernorm", g="mlp.gate_proj", u="mlp.up_proj",
            dn="mlp.down_proj").items()}
    D, (B, L) = d // H, ids.shape

    def norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    pos = torch.arange(L, dtype=torch.float64)
    angle = pos[:, None] * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones_like(angle), angle)  # e^{i * pos * freq}

    def rope(t):  # pairs (t_j, t_{j+D/2}) rotate as one complex number
        z = torch.complex(t[..., : D // 2], t[..., D // 2:]) * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], -1)

    x = emb[ids]
    for i in range(layers):
        n = names(i)
        h = norm(x, w[n["n1"] + ".weight"])
        q = rope(lin(h, n["q"]).view(B, L, H, D))
        k = rope(lin(h, n["k"]).view(B, L, Hkv, D)).repeat_interleave(H // Hkv, dim=2)
        v = lin(h, n["v"]).view(B, L, Hkv, D).repeat_interleave(H // Hkv, dim=2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5, dim=-1)
        x = x + lin(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, L, d), n["o"])
        h = norm(x, w[n["n2"] + ".weight"])
        g = lin(h, n["g"])
        x = x + lin(g * torch.sigmoid(g) * lin(h, n["u"]), n["dn"])
    logits = norm(x, final) @ head.T
    if cfg["model_type"] == "Dream":
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def llada_generate(model, prompt: list[int], steps: int, gen_length: int, block_length: int,
                   cfg_scale: float, mask_id: int) -> list[int]:
    """LLaDA's generate() at temperature 0: whole-canvas forwards, top-k of low-confidence remasking."""
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id)
    x[0, :P] = torch.tensor(prompt)
    n_blocks = gen_length // block_length
    per_block = steps // n_blocks
    for b in range(n_blocks):
        s, e = P + b * block_length, P + (b + 1) * block_length
        n = int((x[0, s:e] == mask_id).sum())
        counts = [n // per_block + (i < n % per_block) for i in range(per_block)]
        for i in range(per_block):
            if cfg_scale > 0:
                un = x.clone()
                un[0, :P] = mask_id
                cond, uncond = model(torch.cat([x, un])).float()
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x)[0]
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, x0[:, None])[:, 0]
            conf[: s] = conf[e:] = float("-inf")
            conf[x[0] != mask_id] = float("-inf")
            idx = conf.topk(counts[i]).indices
            x[0, idx] = x0[idx]
    return x[0, P:].tolist()


def dream_generate(model, prompt: list[int], steps: int, gen_length: int, alg: str, mask_id: int) -> list[int]:
    """Dream's diffusion_generate at temperature 0 for maskgit_plus, topk_margin and entropy."""
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id)
    x[0, :P] = torch.tensor(prompt)
    t = torch.linspace(1, 1e-3, steps + 1)
    for i in range(steps):
        masked = x[0] == mask_id
        p = torch.softmax(model(x)[0][masked].double(), -1)
        conf, x0 = p.max(-1)
        if alg == "topk_margin":
            top = p.sort(-1, descending=True).values
            conf = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            conf = (p * torch.log(p + 1e-10)).sum(-1)
        n = masked.sum() / 1  # float32, as the reference divides by the batch size
        k = int(n * (1 - t[i + 1] / t[i])) if i < steps - 1 else int(n)
        full = torch.full((x.shape[1],), float("-inf"), dtype=torch.float64)
        full[masked] = conf
        if k > 0:
            idx = full.topk(k).indices
            cand = torch.full_like(x[0], mask_id)
            cand[masked] = x0
            x[0, idx] = cand[idx]
    return x[0, P:].tolist()


def fast_dllm_generate(model, prompt: list[int], gen_length: int, block_length: int, mask_id: int,
                       threshold: float | None = None, factor: float | None = None) -> tuple[list[int], int]:
    """Fast-dLLM's generate() without a cache at temperature 0, with its threshold or its dynamic factor rule:
    each block is denoised until no mask is left, one whole-canvas forward a step. Returns (tokens, nfe)."""
    P = len(prompt)
    x = torch.full((1, P + gen_length), mask_id)
    x[0, :P] = torch.tensor(prompt)
    nfe = 0
    for s in range(P, P + gen_length, block_length):
        e = s + block_length
        while (x[0, s:e] == mask_id).any():
            logits = model(x)[0]
            nfe += 1
            x0 = logits.argmax(-1)
            conf = torch.softmax(logits.double(), -1).gather(-1, x0[:, None])[:, 0]
            masked = [i for i in range(s, e) if x[0, i] == mask_id]
            ranked = sorted(masked, key=lambda i: -conf[i].item())
            if threshold is not None:  # the most confident, then every other that reaches the threshold
                take = ranked[:1] + [i for i in ranked[1:] if conf[i] >= threshold]
            else:  # walk down the ranking until a token misses its bound 1 - factor / (n + 1)
                top = 0
                for top, i in enumerate(ranked):
                    bound = -1.0 if top == 0 else 1 - factor / (top + 2)
                    if conf[i].item() < bound:
                        break
                if top == 0 or top == len(ranked) - 1:
                    top += 1
                take = ranked[:top]
            for i in take:
                x[0, i] = x0[i]
    return x[0, P:].tolist(), nfe
