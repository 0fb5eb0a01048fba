"""Per-request generation settings, validated once so every later stage can trust them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

REMASKING = ("low_confidence", "random", "entropy", "margin", "origin")
# Dream's `alg` names for the same policies (Dream's `entropy` and `origin` keep their names).
REMASKING_ALIASES = {"maskgit_plus": "low_confidence", "topk_margin": "margin"}
CACHES = ("none", "prefix", "dual")
SCHEDULES = ("linear", "timestep")


def _is_int(v: object) -> bool:
    return type(v) is int


def _is_num(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


SEED_MIN, SEED_MAX = -2**63, 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows
# The references guide with scales of a few units. Far above, guidance only makes the distribution one-hot,
# and near fp32's range the guided logits overflow to inf and NaN.
MAX_CFG = 100
# Gumbel-max adds temperature * log(-log u), up to 37 temperatures in size, and alg_temp divides a confidence of
# at most 24 in size: these bounds keep both finite in float64. They refuse only settings that act as the bounds
# do to float64's resolution (a uniform draw; a top-k choice), and would otherwise overflow to inf and NaN.
MAX_TEMPERATURE = 1e300
MIN_ALG_TEMP = 1e-300


@dataclass(frozen=True)
class SamplingParams:
    """How one request is denoised.

    max_tokens:   tokens to generate; the canvas is this rounded up to whole blocks.
    steps:        denoising steps over the whole canvas, split evenly across blocks
                  (default: one token per step). Ignored with `threshold` or `factor`.
    block_length: semi-autoregressive block size; one longer than max_tokens shrinks to it (one global
                  block, as Dream decodes).
    temperature:  0 is greedy; above 0, Gumbel-max sampling in float64 (at most 1e300, where it is uniform).
    top_p:        nucleus filter applied before sampling and to the confidence distribution.
    remasking:    which masked tokens to commit first: low_confidence (probability of the chosen token),
                  margin (top-1 minus top-2), entropy (negative entropy), random (uniform), or origin
                  (Dream: each masked token is committed independently with the step's ratio).
                  Dream's names maskgit_plus and topk_margin are accepted.
    threshold:    Fast-dLLM parallel decoding: commit every token whose confidence reaches it, and always
                  the most confident one.
    factor:       Fast-dLLM's dynamic parallel decoding: with the block's masked tokens ranked by confidence,
                  commit the n-th (n = 1, 2, ...) while its confidence is at least 1 - factor / (n + 1); always
                  the most confident one, and, as Fast-dLLM does, all of them when only the last falls short.
                  Not with `threshold`. Either of the two ignores `steps`: each block runs until done.
    cfg_scale:    classifier-free guidance, 0 to 100; the unconditional pass masks the prompt (costs 2 nfe a step).
    cache:        none (full forward every step), prefix or dual (Fast-dLLM's caches, refreshed per block).
    seed:         seeds this request's own generator, so results do not depend on other requests.
    stop:         strings that end the text; the stop string itself is not returned.
    ignore_eos:   decode the whole canvas and return it, EOS tokens included.
    alg_temp:     Dream: 0, or at least 1e-300: positions are then sampled from softmax(confidence / alg_temp)
                  instead of taken by top-k.
    schedule:     linear (LLaDA: even split per block) or timestep (Dream: 1 - s/t of the remaining masks);
                  default: the model family's own.
    presence_penalty, frequency_penalty: OpenAI's, in [-2, 2]: a token's logits are lowered by presence_penalty if
                  this request has generated it, and by frequency_penalty times the number of times (counted over
                  the tokens committed so far, the prompt excluded).
    logit_bias:   OpenAI's: {token id: bias in [-100, 100]} added to those tokens' logits at every step
                  (stored as sorted (id, bias) pairs).
    logprobs:     return each generated token's log-probability, and this many of the most likely tokens
                  (0 to 20), from the distribution at the step that committed it: the model's (after CFG),
                  before temperature and top_p. None: no logprobs.
    """

    max_tokens: int = 128
    steps: int | None = None
    block_length: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float | None = None
    cfg_scale: float = 0.0
    cache: str = "none"
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    alg_temp: float = 0.0
    schedule: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {expected}, got {getattr(self, name)!r}")

        check("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1")
        check("steps", self.steps is None or (_is_int(self.steps) and self.steps >= 1), "null or an integer >= 1")
        check("block_length", _is_int(self.block_length) and self.block_length >= 1, "an integer >= 1")
        check("temperature", _is_num(self.temperature) and 0 <= self.temperature <= MAX_TEMPERATURE,
              f"a number in [0, {MAX_TEMPERATURE:g}]")
        check("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
        object.__setattr__(self, "remasking", REMASKING_ALIASES.get(self.remasking, self.remasking))
        check("remasking", self.remasking in REMASKING, f"one of {list(REMASKING) + list(REMASKING_ALIASES)}")
        check("threshold", self.threshold is None or (_is_num(self.threshold) and 0 < self.threshold <= 1),
              "null or a number in (0, 1]")
        check("factor", self.factor is None or (_is_num(self.factor) and self.factor > 0), "null or a number > 0")
        if self.threshold is not None and self.factor is not None:
            raise ValueError("SamplingParams.factor must be null when threshold is set: they are two rules for the "
                             "same choice; set one of them")
        check("cfg_scale", _is_num(self.cfg_scale) and 0 <= self.cfg_scale <= MAX_CFG, f"a number in [0, {MAX_CFG}]")
        check("cache", self.cache in CACHES, f"one of {list(CACHES)}")
        check("seed", self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX),
              f"null or an integer in [{SEED_MIN}, {SEED_MAX}]")
        if isinstance(self.stop, str) or self.stop is None:
            object.__setattr__(self, "stop", () if self.stop is None else (self.stop,))
        stop_ok = isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop)
        check("stop", stop_ok, "a non-empty string or a list of non-empty strings")
        if "" in self.stop:  # it would match everywhere; named plainly rather than shown as ('',)
            raise ValueError("SamplingParams.stop must be a non-empty string or a list of non-empty strings, got an "
                             "empty string")
        object.__setattr__(self, "stop", tuple(self.stop))
        check("ignore_eos", type(self.ignore_eos) is bool, "true or false")
        check("alg_temp", _is_num(self.alg_temp) and (self.alg_temp == 0 or self.alg_temp >= MIN_ALG_TEMP),
              f"0 or a number >= {MIN_ALG_TEMP:g}")
        check("schedule", self.schedule is None or self.schedule in SCHEDULES, f"null or one of {list(SCHEDULES)}")
        for name in ("presence_penalty", "frequency_penalty"):
            check(name, _is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, "a number in [-2, 2]")
        bias = list(self.logit_bias.items()) if isinstance(self.logit_bias, dict) else self.logit_bias
        bias_ok = isinstance(bias, (tuple, list)) and all(
            isinstance(b, (tuple, list)) and len(b) == 2 and _is_int(b[0]) and b[0] >= 0 and _is_num(b[1])
            and -100 <= b[1] <= 100 for b in bias)
        check("logit_bias", bias_ok, "a map of token ids to numbers in [-100, 100]")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(i), float(b)) for i, b in bias)))
        check("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
              f"null or an integer in [0, {MAX_LOGPROBS}]")

    @property
    def parallel(self) -> bool:
        """Fast-dLLM parallel decoding (a threshold or a factor): confidence decides each step's commits, and
        `steps` is ignored."""
        return self.threshold is not None or self.factor is not None
