"""OpenAI's logprobs objects from the engine's TokenLogprob lists: chat's `content` entries, and the completions
API's parallel lists.

A token's text is what it adds to the text decoded from the few tokens before it: decoded alone, a SentencePiece
token loses a word's leading space. A token that ends inside a UTF-8 character shows U+FFFD, as in the text.
"""
from __future__ import annotations

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


def chat_logprobs(tokenizer: PreTrainedTokenizerBase, entries: list[TokenLogprob], before: list[int]) -> dict:
    """`{"content": [...]}` for `entries`, the tokens that follow the answer's tokens `before`."""
    content, before = [], list(before)
    for e in entries:
        top = [_chat_entry(token_text(tokenizer, before, i), lp) for i, lp in e.top]
        content.append(_chat_entry(token_text(tokenizer, before, e.token_id), e.logprob) | {"top_logprobs": top})
        before.append(e.token_id)
    return {"content": content}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


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
