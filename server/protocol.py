"""The OpenAI request schemas qdllm accepts, with the diffusion settings as extra body fields, and the
mapping from a validated request to the engine's SamplingParams."""
from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from qdllm.engine import SamplingParams

from .errors import APIError

# The diffusion settings a request may carry beside the OpenAI fields (DESIGN.md, "Server").
DIFFUSION_FIELDS = ("steps", "block_length", "remasking", "threshold", "cfg_scale", "cache", "ignore_eos")
# OpenAI fields whose effect qdllm does not implement: refused when set to anything but their neutral value.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"})}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    cfg_scale: float | None = None
    cache: str | None = None
    ignore_eos: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" or p.text is None for p in self.content):
            raise APIError(400, "only text content parts are supported", "messages")
        return "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


def parse(body: bytes, schema: type[_Request]) -> _Request:
    """A validated request from raw bytes; any problem becomes one APIError naming the field."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    for field, neutral in UNSUPPORTED.items():
        if field in obj and not any(obj[field] == v and type(obj[field]) is type(v) for v in neutral):
            raise APIError(400, f"'{field}' is not supported by qdllm", field)
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(422, f"{loc}: {err['msg']}", loc) from None


def sampling_params(req: _Request, defaults: dict, index: int) -> SamplingParams:
    """The engine's settings for choice `index`: the model's defaults, overridden by what the request sets.
    With a seed, choice i uses seed + i, so n > 1 samples differ and still reproduce."""
    fields = dict(defaults)
    max_tokens = req.max_completion_tokens if isinstance(req, ChatRequest) and req.max_tokens is None \
        else req.max_tokens
    given = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p}
    given.update((f, getattr(req, f)) for f in DIFFUSION_FIELDS)
    fields.update((k, v) for k, v in given.items() if v is not None)
    if req.stop is not None:
        fields["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    if req.seed is not None:
        fields["seed"] = req.seed + index
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        m = re.match(r"SamplingParams\.(\w+) (.*)", str(e))
        raise APIError(400, f"{m[1]} {m[2]}" if m else str(e), m[1] if m else None) from None
