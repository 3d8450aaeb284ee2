"""Text at the edge, in one place: client text in (JSON bodies, prompts), token ids -> the text and
logprob names a client sees (streaming detokenisation, stop strings, unique token names)."""

from __future__ import annotations

import gc
import json
import math
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


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but no double holds it
        raise json.JSONDecodeError(f"{text} is out of a double's range", text, 0)
    return value


def parse_client_json(body: bytes) -> Any:
    """A request body as JSON, whatever bytes it holds: invalid UTF-8 (e.g. CESU-8 surrogates)
    and lone surrogates become U+FFFD; NaN and Infinity, which JSON lacks, are a decode error,
    and so is a number too large for a double (Python would read it as infinity)."""
    text = body.decode("utf-8", "replace")
    collecting = gc.isenabled()
    gc.disable()  # a body of many small lists would trigger a collection every 700 of them
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
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


def encode_with_offsets(
    tokenizer: Tokenizer, texts: list[str]
) -> list[tuple[list[int], list[int]]]:
    """Each text's ids (no BOS) and where each token starts in the text, in characters: the
    tokenizer's own offsets, so a special-token string the client wrote (`<|pad|>`) is counted
    as written, where decoding would render it as nothing. GIL-free, as `encode_texts`."""
    encodings = tokenizer.tok.encode_batch(texts, add_special_tokens=False)
    return [(e.ids, [start for start, _ in e.offsets]) for e in encodings]


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


class StopMatcher:
    """Finds stop strings in text that arrives in pieces, in time linear in that text: one
    Knuth-Morris-Pratt automaton per stop string (its state: the longest prefix of the stop that
    ends the text so far). Searching the held-back text again on every token, as a plain
    `find` and suffix test do, costs the square of it, and a client's long stop strings make that
    seconds per token. Each automaton's table is built only as far as its matches reach, so
    long stop strings that never match cost nothing."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(dict.fromkeys(s for s in stops if s))
        self.fail: list[list[int]] = [[0] for _ in self.stops]  # KMP's table, built lazily
        self.state = [0] * len(self.stops)

    def feed(self, text: str, offset: int, report: bool = True) -> int | None:
        """Advance over `text`, whose first character is at `offset` in the caller's buffer.
        Returns where, in that buffer, the earliest-starting stop string completed within `text`
        begins (None if none did, or if `report` is false: completions then pass unnoticed)."""
        best = None
        for i, stop in enumerate(self.stops):
            m, fail, n = self.state[i], self.fail[i], len(stop)
            if m == 0 and stop[0] not in text:  # no match can start here: state stays 0
                continue
            for j, c in enumerate(text):
                while m and (m == n or stop[m] != c):
                    m = fail[m - 1]
                if stop[m] == c:
                    m += 1
                    if m > len(fail):
                        _extend_table(stop, fail)
                if m == n and report:
                    start = offset + j - n + 1
                    best = start if best is None else min(best, start)
                    break
            self.state[i] = m
        return best

    def held(self) -> int:
        """How many characters at the end of the text may still begin a stop string."""
        return max((m if m < len(s) else f[m - 1] for m, s, f in zip(self.state, self.stops,
                    self.fail, strict=True)), default=0)  # fmt: skip


def _extend_table(s: str, pi: list[int]) -> None:
    """One more entry of KMP's table of `s`: pi[i] = the longest proper prefix of s[: i + 1]
    that is also its suffix."""
    i = len(pi)
    k = pi[i - 1]
    while k and s[i] != s[k]:
        k = pi[k - 1]
    pi.append(k + (s[i] == s[k]))


class ChoiceText:
    """Accumulates one choice's text. Text that might be the start of a stop string is held
    back until it is known not to be, so a stop string never leaks, even split across tokens.
    As in vLLM, stop strings count from the `min_tokens`-th token on (a stop string that ends
    earlier is kept as text)."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stops)
        self.min_tokens = min_tokens
        self.tokens = 0  # tokens pushed
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
        self.tokens += 1
        delta = self.decoder.push(token_id)
        self.token_start = token_start(self.decoded, delta, self.tokenizer.token_text(token_id))
        return self._release(delta, final=False)

    def finish(self) -> str:
        """End of generation: release whatever is held (a stop string can no longer complete)."""
        if self.stopped:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, delta: str, final: bool) -> str:
        self.decoded += len(delta)
        buf = self.pending + delta
        cut = self.matcher.feed(delta, len(self.pending), self.tokens >= self.min_tokens)
        if cut is not None:
            out, self.pending, self.stopped = buf[:cut], "", True
        else:
            hold = 0 if final else self.matcher.held()
            out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out


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
