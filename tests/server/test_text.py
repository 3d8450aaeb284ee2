"""Streaming text at the edge: incremental detokenisation and stop strings across tokens."""

import pytest

from parcae_serve.model.tokenizer import IncrementalDecoder, Tokenizer
from parcae_serve.server.api.text import ChoiceText

TEXT = "héllo wörld — 你好 def f(x):\n    return x ** 2  # 🎉 done\nprint(f(3))"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_model_dir)


def test_incremental_decoding_equals_decoding_all_at_once(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)  # multi-byte characters are never split


@pytest.mark.parametrize("stop", ["return", "x ** 2", "🎉", "\nprint", "f(3))"])
def test_stop_string_is_cut_and_never_leaks_even_across_tokens(tokenizer, stop: str) -> None:
    text = ChoiceText(tokenizer, ["never-there", stop])
    released = ""
    for token in tokenizer.encode(TEXT, add_bos=False):
        released += text.push(token)
        if text.stopped:
            break
    released += text.finish()
    assert text.stopped
    assert released == text.text == TEXT[: TEXT.index(stop)]


def test_text_held_for_a_possible_stop_is_released_at_the_end(tokenizer) -> None:
    text = ChoiceText(tokenizer, ["print(f(4"])
    released = "".join(text.push(t) for t in tokenizer.encode(TEXT, add_bos=False))
    assert not released.endswith("print(f(")  # held back while it could still become the stop
    assert released + text.finish() == TEXT
    assert not text.stopped
