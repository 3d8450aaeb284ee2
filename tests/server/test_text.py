"""Streaming text at the edge: incremental detokenisation and stop strings across tokens."""

import itertools
import random
import time

import pytest

from parcae_serve.model.tokenizer import IncrementalDecoder, Tokenizer
from parcae_serve.server.api.text import ChoiceText, StopMatcher

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


def test_stop_matcher_agrees_with_a_plain_search_over_random_pieces() -> None:
    """Text fed in random pieces, as tokens come: a piece that completes a stop string cuts at
    the earliest start among the stops completed in it (what searching the text does), and what
    is held back is the longest end of the text that begins a stop string."""
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("aab") for _ in range(rng.randrange(1, 30)))
        stops = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 5))) for _ in range(3)]
        matcher, fed = StopMatcher(stops), 0
        while fed < len(text):
            piece = text[fed : fed + rng.randrange(1, 4)]
            cut = matcher.feed(piece, fed)
            seen, fed = text[: fed + len(piece)], fed + len(piece)
            firsts = [seen.find(s) for s in stops if seen.find(s) >= 0]
            assert cut == (min(firsts) if firsts else None)
            if cut is not None:
                break
            held = max((k for s in stops for k in range(1, min(len(s), fed + 1))
                        if seen.endswith(s[:k])), default=0)  # fmt: skip
            assert matcher.held() == held


def test_stop_strings_count_from_min_tokens_on(tokenizer) -> None:
    """vLLM's min_tokens: a stop string that ends within the first min_tokens - 1 tokens stays
    text; the first one that ends later cuts."""
    ids, stop = tokenizer.encode(TEXT, add_bos=False), "l"
    decoder = IncrementalDecoder(tokenizer)
    prefixes = list(itertools.accumulate(decoder.push(t) for t in ids))
    k = next(i for i, text in enumerate(prefixes, 1) if stop in text)  # the first stop's token
    decoded = prefixes[k - 1]
    text, released = ChoiceText(tokenizer, [stop], min_tokens=k + 1), ""
    for token in ids:
        released += text.push(token)
        if text.stopped:
            break
    released += text.finish()
    assert text.stopped and released == TEXT[: TEXT.index(stop, len(decoded))]


def test_long_stop_strings_cost_linear_time(tokenizer) -> None:
    """A held-back prefix of a 40,000-character stop string and 63 long stops that never match:
    each token is checked in time linear in its own text (the quadratic search took ~100 s)."""
    stops = ["b" * 100_000] * 63 + ["a" * 40_000 + "Z"]
    matcher = StopMatcher(stops)
    start = time.perf_counter()
    for i in range(4000):
        assert matcher.feed("aaaaaaaa", 8 * i) is None
    assert matcher.held() == 32_000  # everything so far could still begin the last stop
    assert time.perf_counter() - start < 20
