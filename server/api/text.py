"""Text at the edge, in one place: client text in (JSON bodies, prompts), token ids -> the text and
logprob names a client sees (streaming detokenisation, stop strings, unique token names)."""

from __future__ import annotations

import gc
import json
import re
from typing import Any

from parcae_serve.model.tokenizer import IncrementalDecoder, Tokenizer

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# Client text in -----------------------------------------------------------------------------------
def clean_text(text: str) -> str:
    """Any string a client sends, made encodable: a lone surrogate (a JSON "\\ud800" escape) is
    not a character, so it becomes U+FFFD, as undecodable bytes do."""
    return _SURROGATE.sub(REPLACEMENT, text) if _SURROGATE.search(text) else text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(k): _clean(v) for k, v in value.items()}
    return value


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def parse_client_json(body: bytes) -> Any:
    """A request body as JSON, whatever bytes it holds: invalid UTF-8 (e.g. CESU-8 surrogates)
    and lone surrogates become U+FFFD; NaN and Infinity, which JSON lacks, are a decode error."""
    text = body.decode("utf-8", "replace")
    collecting = gc.isenabled()
    gc.disable()  # a body of many small lists would trigger a collection every 700 of them
    try:
        value = json.loads(text, parse_constant=_no_constant)
    finally:
        if collecting:
            gc.enable()
    return _clean(value) if _SURROGATE_ESCAPE.search(text) else value  # only escapes make them


def encode_texts(tokenizer: Tokenizer, texts: list[str], add_bos: bool = True) -> list[list[int]]:
    """Tokenise several texts at once (with BOS first if `add_bos`, see `with_bos`). Blocking
    but GIL-free (the Rust batch call releases it), so callers run it in a worker thread and the
    event loop keeps serving."""
    encodings = tokenizer.tok.encode_batch(texts, add_special_tokens=False)
    return [with_bos(tokenizer, e.ids)[0] if add_bos else e.ids for e in encodings]


def with_bos(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[int], bool]:
    """`ids` starting with BOS, and whether it was added here: not when they already start with
    it (a text that begins with the BOS string, token ids that carry it), nor without a BOS."""
    bos = tokenizer.bos_id
    if bos is None or (ids and ids[0] == bos):
        return list(ids), False
    return [bos, *ids], True


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """An upper bound on the characters one token covers (its vocabulary piece is never shorter
    than the text it stands for), so a prompt of more than this times the context cannot fit."""
    return max(1, *(len(piece) for piece in tokenizer.tok.get_vocab()))


# Token ids out -------------------------------------------------------------------------------------
def token_names(tokenizer: Tokenizer, ids: list[int], as_ids: bool = False) -> dict[int, str]:
    """Names for the tokens of one logprobs position, unique among themselves: each token's text,
    or `token_id:<id>` (vLLM's `return_tokens_as_token_ids` form) for every token whose text
    another token of the position shares (byte pieces all render as U+FFFD)."""
    ids = list(dict.fromkeys(ids))
    if as_ids:
        return {t: f"token_id:{t}" for t in ids}
    texts = {t: tokenizer.token_text(t) for t in ids}
    seen: dict[str, int] = {}
    for text in texts.values():
        seen[text] = seen.get(text, 0) + 1
    by_id = {t: f"token_id:{t}" for t in ids if seen[texts[t]] > 1}
    fallback = set(by_id.values())
    return {t: by_id.get(t) or (text if text not in fallback else f"token_id:{t}")
            for t, text in texts.items()}  # fmt: skip


class ChoiceText:
    """Accumulates one choice's text. Text that might be the start of a stop string is held
    back until it is known not to be, so a stop string never leaks, even split across tokens."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.text = ""  # released to the client
        self.pending = ""  # held back
        self.decoded = 0  # characters decoded so far (released + held)
        self.token_start = 0  # where the last pushed token's text starts
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly released text ('' if none yet)."""
        if self.stopped:
            self.token_start = self.decoded
            return ""
        delta = self.decoder.push(token_id)
        self.token_start = token_start(self.decoded, delta, self.tokenizer.token_text(token_id))
        return self._release(delta)

    def finish(self) -> str:
        """End of generation: release whatever is held (a stop string can no longer complete)."""
        if self.stopped:
            return ""
        flushed = self.decoder.flush()
        self.decoded += len(flushed)
        tail = self.pending + flushed
        self.pending = ""
        cut = self._find_stop(tail)
        if cut is not None:
            tail, self.stopped = tail[:cut], True
        self.text += tail
        return tail

    def _release(self, delta: str) -> str:
        self.decoded += len(delta)
        buf = self.pending + delta
        cut = self._find_stop(buf)
        if cut is not None:
            out, self.pending, self.stopped = buf[:cut], "", True
        else:
            hold = self._held_suffix(buf)
            out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _find_stop(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if stop.startswith(buf[-k:]):
                    best = k
                    break
        return best


def token_start(decoded: int, delta: str, own: str) -> int:
    """Where a token's text starts, given the characters decoded before it and the text its push
    released (which may end text held from earlier tokens: an incomplete or invalid byte
    sequence): its own text ends the delta. Always between `decoded` and `decoded + len(delta)`,
    so offsets never decrease and never pass the text."""
    return decoded + max(0, len(delta) - len(own))


def token_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token starts in the decoded text of `ids`."""
    decoder, offsets, decoded = IncrementalDecoder(tokenizer), [], 0
    for token in ids:
        delta = decoder.push(token)
        offsets.append(token_start(decoded, delta, tokenizer.token_text(token)))
        decoded += len(delta)
    return offsets
