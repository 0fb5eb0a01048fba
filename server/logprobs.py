"""OpenAI's logprobs objects from the engine's TokenLogprob lists: chat's `content` entries, and the completions
API's parallel lists.

A token's text is what it adds to the text decoded from the few tokens before it: decoded alone, a SentencePiece
token loses a word's leading space. A token that ends inside a UTF-8 character shows U+FFFD, as in the text, but
its `bytes` are its own: a client that joins them gets the answer's exact UTF-8, a character split over tokens
included.
"""
from __future__ import annotations

import json
import weakref
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from qdllm.engine import TokenLogprob

CONTEXT = 4  # tokens decoded before each one, enough for a tokenizer's merges at the boundary


def token_text(tokenizer: PreTrainedTokenizerBase, before: list[int], token: int) -> str:
    """What `token` adds to the text of the tokens `before` it."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    before = before[-CONTEXT:]
    prefix, full = decode(before), decode(before + [token])
    return full[len(prefix):] if full.startswith(prefix) else decode([token])


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2's scheme, which Qwen2's and so Dream's tokenizer use) writes every byte as one
    printable character: the printable Latin-1 bytes as themselves, the n-th other byte (in byte order) as
    chr(256 + n)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


BYTE_LEVEL = _byte_level_alphabet()
_PIECE_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its piece-to-bytes rule


def _piece_rule(tokenizer: PreTrainedTokenizerBase) -> Callable[[str], bytes | None] | None:
    """How the tokenizer's vocabulary spells bytes, from its decoder: byte-level BPE, or SentencePiece's byte
    fallback (<0xNN> pieces, and a character for the space). None where it has neither, or no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
    parts = [d for d in (decoder or {}).get("decoders", [decoder]) if d]
    kinds = {d.get("type") for d in parts}
    if "ByteLevel" in kinds:
        return lambda piece: bytes(BYTE_LEVEL[c] for c in piece) if all(c in BYTE_LEVEL for c in piece) else None
    if "ByteFallback" not in kinds:
        return None
    space = "\u2581"  # SentencePiece's, unless the decoder names another
    for d in parts:
        if d.get("type") == "Replace" and d.get("content") == " ":
            space = d["pattern"].get("String", space)
        elif d.get("type") == "Metaspace":
            space = d.get("replacement", space)

    def fallback(piece: str) -> bytes:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(space, " ").encode("utf-8")
    return fallback


def token_bytes(tokenizer: PreTrainedTokenizerBase, token: int, text: str) -> bytes:
    """The UTF-8 of the token's text; but where the token holds part of a character (its text then shows U+FFFD,
    or nothing), the bytes its vocabulary entry spells, so that the answer's tokens join to its exact bytes."""
    if tokenizer not in _PIECE_BYTES:
        _PIECE_BYTES[tokenizer] = _piece_rule(tokenizer)
    rule = _PIECE_BYTES[tokenizer]
    raw = rule(tokenizer.convert_ids_to_tokens(token)) if rule is not None else None
    if raw is not None:
        try:
            raw.decode("utf-8")  # whole characters: the text says the same, with the tokenizer's spacing
        except UnicodeDecodeError:
            return raw
    return text.encode("utf-8")


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob], before: list[int]) -> dict:
    """`{"content": [...]}` for `entries`, the tokens that follow the answer's tokens `before`."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, before, token)
        return {"token": text, "logprob": logprob, "bytes": list(token_bytes(tokenizer, token, text))}

    content, before = [], list(before)
    for e in entries:
        content.append(entry(e.token_id, e.logprob) | {"top_logprobs": [entry(i, lp) for i, lp in e.top]})
        before.append(e.token_id)
    return {"content": content}


def completion_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob], before: list[int],
                        offset: int) -> dict:
    """The completions API's lists for `entries`; `offset` is where the first one starts in the answer's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    before = list(before)
    for e in entries:
        text = token_text(tokenizer, before, e.token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(e.logprob)
        out["top_logprobs"].append({token_text(tokenizer, before, i): lp for i, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(text)
        before.append(e.token_id)
    return out
