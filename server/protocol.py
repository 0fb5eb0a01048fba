"""The OpenAI request schemas qdllm accepts, with the diffusion settings as extra body fields, and the
mapping from a validated request to the engine's SamplingParams."""
from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from qdllm.engine import SamplingParams
from qdllm.engine.sampling import SEED_MAX, SEED_MIN

from .errors import APIError

# The diffusion settings a request may carry beside the OpenAI fields (DESIGN.md, "Server").
DIFFUSION_FIELDS = ("steps", "block_length", "remasking", "threshold", "factor", "cfg_scale", "cache",
                    "ignore_eos", "alg_temp", "schedule")
# Two rules for one choice: a request that sets one replaces a default of the other.
EXCLUSIVE = (("threshold", "factor"), ("factor", "threshold"))
# OpenAI fields that change nothing here (bookkeeping, routing): accepted and dropped. Any other field that the
# schemas do not name is refused, so a misspelt setting ("threshhold") is not silently without effect.
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier")
# OpenAI fields whose effect qdllm does not implement: refused when set to anything but their neutral value.
UNSUPPORTED = {"best_of": (None, 1), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "tool_choice": (None, "none", "auto"),
               "function_call": (None, "none", "auto"), "modalities": (None, ["text"]), "audio": (None,)}
# Fields whose type is a union: pydantic reports one error per member, tagged 'str', 'list[int]', ...; the
# client needs the field and what it accepts.
UNIONS = {"prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
          "stop": "a string or a list of strings",
          "content": 'a string or a list of content parts like {"type": "text", "text": "..."}'}


class _Strict(BaseModel):
    # Extra fields inside messages are ignored: clients send back assistant messages with fields of their own.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token ids as strings, as JSON keys are
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    factor: float | None = None
    cfg_scale: float | None = None
    cache: str | None = None
    ignore_eos: bool | None = None
    alg_temp: float | None = None
    schedule: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # the chosen token's logprob and this many alternatives
    suffix: str | None = None  # text after the completion: the canvas is filled in between
    echo: bool | None = None  # the text starts with the prompt's


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list | None = None  # read only to refuse them: dropping them would change the conversation
    function_call: dict | None = None

    def text(self, index: int) -> str:
        """The message's text; `index` (its place in `messages`) names what is wrong in an error."""
        where = f"messages.{index}"
        for field in ("tool_calls", "function_call"):
            if getattr(self, field):
                raise APIError(400, f"{where}.{field} is not supported by qdllm", f"{where}.{field}")
        if self.content is None and self.role != "assistant":  # an assistant turn may hold only tool calls
            raise APIError(400, f"{where}.content is required in a '{self.role}' message", f"{where}.content")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for j, p in enumerate(self.content):
            if p.type != "text":
                raise APIError(400, f"{where}.content.{j}: content parts of type '{p.type}' are not supported "
                                    f"by qdllm; only 'text' parts are", f"{where}.content.{j}.type")
            if p.text is None:
                raise APIError(400, f"{where}.content.{j}.text is required in a 'text' part",
                               f"{where}.content.{j}.text")
        return "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None  # alternatives per token; needs logprobs


class _NotJSON(ValueError):
    pass


def _no_constant(name: str) -> None:
    """Python's json reads NaN and Infinity, which JSON does not have (and which no setting may be)."""
    raise _NotJSON(f"{name} is not a JSON value")


def json_values(body: bytes) -> int:
    """About how many JSON values `body` holds outside its strings (its commas and opening brackets), in C and
    in linear time: an 8 MB body counts in about 40 ms, where parsing one of many small arrays blocks the event
    loop for seconds. Escaped backslashes and quotes go first, so that no string holds a quote."""
    outside = re.sub(rb'"[^"]*"', b"", body.replace(b"\\\\", b"").replace(b'\\"', b""))
    return outside.count(b",") + outside.count(b"[") + outside.count(b"{")


def parse(body: bytes, schema: type[_Request], max_values: int) -> _Request:
    """A validated request from raw bytes; any problem becomes one APIError naming the field. A body of more than
    `max_values` JSON values, more than any request the server can run holds, is refused before it is parsed."""
    if len(body) > max_values and (values := json_values(body)) > max_values:  # each counted byte is one
        raise APIError(413, f"the request body holds about {values} JSON values; no request this server can run "
                            f"holds more than {max_values}")
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") \
            from None
    except _NotJSON as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError:  # Python refuses to read an integer of more than 4300 digits
        raise APIError(400, "the request body holds a number with too many digits") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    if (path := _lone_surrogate(body, obj)) is not None:
        raise APIError(400, f"{path} is not valid Unicode: it holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)",
                       path)
    for field, neutral in UNSUPPORTED.items():
        if field in obj and not any(obj[field] == v and type(obj[field]) is type(v) for v in neutral):
            raise APIError(400, f"'{field}' is not supported by qdllm", field)
    try:
        return schema.model_validate({k: v for k, v in obj.items() if k not in IGNORED and k not in UNSUPPORTED})
    except ValidationError as e:
        raise _validation_error(e.errors()[0], obj) from None


def _validation_error(err: dict, obj: dict) -> APIError:
    """One line naming the field as the client sent it, without pydantic's union tags and class names."""
    loc = list(err["loc"])
    cut = next((i + 1 for i, p in enumerate(loc[:-1]) if p in UNIONS), None)
    if cut is not None:
        loc = loc[:cut]
    path = ".".join(str(p) for p in loc) or "body"
    if cut is not None:
        return APIError(422, f"{path} must be {UNIONS[loc[-1]]}, got {_show(_at(obj, loc))}", path)
    if err["type"] in ("model_type", "dict_type"):
        return APIError(422, f"{path} must be an object, got {_show(err['input'])}", path)
    if err["type"] == "missing":
        return APIError(422, f"{path} is required", path)
    if err["type"] == "extra_forbidden":
        return APIError(400, f"'{path}' is not a parameter qdllm takes (see the README's server reference)", path)
    return APIError(422, f"{path}: {err['msg']}, got {_show(err['input'])}", path)


def _at(obj: object, loc: list) -> object:
    for p in loc:
        obj = obj[p]
    return obj


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _lone_surrogate(body: bytes, obj: dict) -> str | None:
    """The path of the first string (or key) holding a lone surrogate, or None. JSON's \\ud800 escapes decode to
    one, and neither the tokenizer nor the error response can encode it."""
    if not re.search(rb"\\u[dD][89a-fA-F]", body):  # no surrogate escape at all: the usual case, at no cost
        return None
    stack: list[tuple[str, object]] = [("body", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and not _encodes(value):
            return path
        if isinstance(value, dict):
            if not all(_encodes(k) for k in value):
                return path
            stack.extend((k if path == "body" else f"{path}.{k}", v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in reversed(list(enumerate(value))))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sampling_params(req: _Request, defaults: dict, index: int) -> SamplingParams:
    """The engine's settings for choice `index`: the model's defaults, overridden by what the request sets.
    With a seed, choice i uses seed + i, so n > 1 samples differ and still reproduce."""
    fields = dict(defaults)
    if req.stream_options is not None and not req.stream:  # as OpenAI refuses it: the options would go unused
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != req.max_completion_tokens:
            raise APIError(400, f"max_tokens ({max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) "
                                "disagree; send one of them", "max_completion_tokens")
        max_tokens = req.max_completion_tokens
    given = {"max_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
             "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty}
    given.update((f, getattr(req, f)) for f in DIFFUSION_FIELDS)
    fields.update((k, v) for k, v in given.items() if v is not None)
    for rule, other in EXCLUSIVE:
        if given[rule] is not None and given[other] is None:
            fields.pop(other, None)
    if req.stop is not None:
        fields["stop"] = req.stop
    if req.logit_bias is not None:
        if not all(k.isascii() and k.isdigit() for k in req.logit_bias):
            raise APIError(400, "logit_bias keys must be token ids, such as \"50256\"", "logit_bias")
        fields["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
    if isinstance(req, ChatRequest):
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
        fields["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    else:
        fields["logprobs"] = req.logprobs
    if req.seed is not None:
        if not SEED_MIN <= req.seed <= SEED_MAX - (req.n - 1):
            raise APIError(400, f"seed must be an integer from {SEED_MIN} to {SEED_MAX - (req.n - 1)} "
                                f"(choice i of n uses seed + i)", "seed")
        fields["seed"] = req.seed + index
    try:
        params = SamplingParams(**fields)
    except ValueError as e:
        m = re.match(r"SamplingParams\.(\w+) (.*)", str(e))
        field = m[1] if m else None
        if field == "max_tokens" and isinstance(req, ChatRequest) and req.max_tokens is None:
            field = "max_completion_tokens"  # the name the client sent
        if field == "logprobs" and isinstance(req, ChatRequest):
            field = "top_logprobs"
        raise APIError(400, f"{field} {m[2]}" if m else str(e), field) from None
    return params
