"""Text <-> token ids at the edge: a `tokenizers` BPE plus BOS/EOS and streaming detokenisation."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>")
EOS_NAMES = ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")


class Tokenizer:
    def __init__(
        self, tok: HFTokenizer, bos_id: int | None, eos_id: int | None, pad_id: int | None = None
    ) -> None:
        self.tok, self.bos_id, self.eos_id, self.pad_id = tok, bos_id, eos_id, pad_id

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        tok = HFTokenizer.from_file(str(path))
        named = _special_tokens(directory)
        bos = _find(tok, [named.get("bos_token"), *BOS_NAMES])
        eos = _find(tok, [named.get("eos_token"), *EOS_NAMES])
        pad = _find(tok, [named.get("pad_token"), *PAD_NAMES])
        return cls(tok, bos, eos, pad)

    def special_text(self, token_id: int | None) -> str | None:
        """A special token's text (e.g. "<|eos|>"), or None."""
        return None if token_id is None else self.tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's exact bytes (a byte-level BPE piece may be part of a UTF-8 character);
        for a tokenizer that is not byte-level, its text's UTF-8."""
        piece = self.tok.id_to_token(token_id) or ""
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.token_text(token_id).encode()

    def token_text(self, token_id: int) -> str:
        """One token's text as OpenAI's logprobs show it (may be a partial UTF-8 character)."""
        return self.tok.decode([token_id], skip_special_tokens=False)


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (the `tokenizers` ByteLevel one): the printable character
    standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _special_tokens(directory: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.exists():
            for key, value in json.loads(path.read_text()).items():
                if key in ("bos_token", "eos_token", "pad_token"):
                    text = value.get("content") if isinstance(value, dict) else value
                    if isinstance(text, str):
                        out.setdefault(key, text)
    return out


def _find(tok: HFTokenizer, names: list[str | None]) -> int | None:
    for name in names:
        if name is not None and (token_id := tok.token_to_id(name)) is not None:
            return token_id
    return None


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without splitting multi-byte characters, in
    constant work per token: only a short window of recent ids is decoded (TGI's scheme)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this are already released

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        text = decode(self.ids[self.prefix_offset :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""  # nothing new yet, or a character still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(before) :]
