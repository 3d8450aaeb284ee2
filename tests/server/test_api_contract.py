"""The completions contract over real HTTP: logprobs that match the text, streaming that equals
the non-streamed answer, and every field either honoured or refused."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest

CODE = "import os\nimport sys\n"
UNICODE = "héllo wörld — 你好 🎉\ndef f(x):\n"


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def complete(url: str, body: dict) -> dict:
    r = post(url, body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_as_response(url: str, body: dict) -> dict:
    """Stream `body` and fold the events into the shape of a non-streamed response."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    choices: dict[int, dict] = {}
    usage, done = None, False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ") and not done
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                into = choices.setdefault(c["index"], {"index": c["index"], "text": "",
                                                       "logprobs": None, "finish_reason": None})  # fmt: skip
                assert into["finish_reason"] is None, "an event after the finish_reason"
                into["text"] += c["text"]
                into["finish_reason"] = c["finish_reason"]
                if c["logprobs"] is not None:
                    lp = into["logprobs"] = into["logprobs"] or {k: [] for k in c["logprobs"]}
                    for key, values in c["logprobs"].items():
                        lp[key] += values
    assert done
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage}


def same_usage(a: dict, b: dict) -> bool:
    """Equal usage, except how much of the prompt the prefix cache served (the second run of a
    prompt finds the first one's blocks)."""
    drop = "prompt_tokens_details"
    return {k: v for k, v in a.items() if k != drop} == {k: v for k, v in b.items() if k != drop}


def assert_offsets_index_the_text(choice: dict, specials: tuple[str, ...] = ()) -> None:
    """Every text_offset points into the returned text, where that token's text is."""
    text, lp = choice["text"], choice["logprobs"]
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets)
    assert all(0 <= o <= len(text) for o in offsets)
    for offset, token in zip(offsets, lp["tokens"], strict=True):
        plain = "\ufffd" not in token and not token.startswith("token_id:")
        if plain and token not in specials and offset + len(token) <= len(text):
            assert text[offset : offset + len(token)] == token, (offset, token, text)


def assert_top_logprobs_consistent(choice: dict, k: int) -> None:
    """Unique keys, the chosen token among them with its own value, k alternatives."""
    lp = choice["logprobs"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                 strict=True):  # fmt: skip
        if value is None:  # the first prompt token
            assert top is None
            continue
        assert top[token] == pytest.approx(value, abs=1e-6)
        assert len(top) >= max(k, 1)


def assert_same(a, b, path: str = "") -> None:
    """Equal, except that logprob values may differ by float rounding: a sibling choice ended
    by a stop string leaves the batch a step earlier or later, and a different batch shape
    rounds differently (an engine property, the same streamed or not)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


# Kind 1: logprobs match the text --------------------------------------------------------------

OFFSET_CASES = [
    # text held back while a stop string may still match (the reported case)
    {"prompt": CODE, "max_tokens": 20, "temperature": 0, "seed": 2, "logprobs": 1, "stop": ["\n\n"]},
    {"prompt": CODE, "max_tokens": 24, "temperature": 0, "logprobs": 2, "stop": ["\nimport sys"]},
    {"prompt": CODE, "max_tokens": 24, "temperature": 0, "logprobs": 1, "stop": ["os\nimport o"]},
    {"prompt": CODE, "max_tokens": 12, "temperature": 0, "logprobs": 1, "echo": True},
    {"prompt": CODE, "max_tokens": 12, "temperature": 0, "logprobs": 1, "echo": True, "stop": "\n"},
    {"prompt": UNICODE, "max_tokens": 16, "temperature": 0.9, "seed": 4, "logprobs": 3, "echo": True},
    {"prompt": UNICODE, "max_tokens": 0, "logprobs": 5, "echo": True},
]  # fmt: skip


@pytest.mark.parametrize("body", OFFSET_CASES)
def test_text_offsets_index_the_returned_text(builtin_server: str, body: dict) -> None:
    out = complete(builtin_server, body)
    for choice in out["choices"]:
        assert_offsets_index_the_text(choice, specials=("<|bos|>", "<|eos|>"))
        assert_top_logprobs_consistent(choice, body["logprobs"])


@pytest.mark.parametrize("prompt", ["x<|pad|>y", "<|bos|>def f(x):", "def <|eos|> f(x):",
                                    "héllo 🎉<|pad|>"])  # fmt: skip
def test_echoed_special_token_strings_are_offset_as_written(builtin_server, prompt) -> None:
    """A special token's string in a text prompt is a token of its own; echoed, the text is the
    prompt as sent, so each offset counts that string where it stands (decoding renders special
    tokens as nothing, which put every later offset too early)."""
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = complete(builtin_server, body)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == prompt
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    ends = [*lp["text_offset"][1:], len(prompt)]
    pieces = [prompt[a:b] for a, b in zip(lp["text_offset"], ends, strict=True)]
    for piece, token in zip(pieces, lp["tokens"], strict=True):
        if "\ufffd" not in token and piece:  # a character's bytes: all but the last are empty
            assert piece == token, (pieces, lp["tokens"])
    assert "".join(pieces) == prompt


def test_reported_stop_case_has_offsets_one_per_token(builtin_server: str) -> None:
    choice = complete(builtin_server, OFFSET_CASES[0])["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert "\n" in text  # the case exercises text held back for "\n\n"
    starts = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == [min(s, len(text)) for s in starts]


def test_byte_pieces_get_unique_keys_with_their_own_values(live_server: str) -> None:
    """The tiny model's byte-level pieces all render as U+FFFD: keys must not collide."""
    body = {"prompt": UNICODE * 2, "max_tokens": 8, "logprobs": 8, "echo": True, "seed": 1}
    choice = complete(live_server, body)["choices"][0]
    lp = choice["logprobs"]
    assert any(len([k for k in top if k.startswith("token_id:")]) > 1
               for top in lp["top_logprobs"] if top)  # fmt: skip
    assert_top_logprobs_consistent(choice, 8)
    assert_offsets_index_the_text(choice, specials=("<|bos|>",))
    by_id = complete(live_server, {**body, "return_tokens_as_token_ids": True})["choices"][0]
    body_ids = {"prompt": UNICODE * 2, "add_special_tokens": False}  # the added BOS is not echoed
    ids = httpx.post(f"{live_server}/tokenize", json=body_ids).json()["tokens"]
    assert by_id["logprobs"]["tokens"][: len(ids)] == [f"token_id:{t}" for t in ids]
    assert by_id["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    for named, numbered in zip(lp["top_logprobs"], by_id["logprobs"]["top_logprobs"], strict=True):
        assert (named is None) == (numbered is None)
        if named:  # the same alternatives, each with its own value
            assert sorted(named.values()) == pytest.approx(sorted(numbered.values()))
            assert all(k.startswith("token_id:") for k in numbered)


def test_logprobs_zero_gives_the_sampled_tokens_entry(builtin_server: str) -> None:
    body = {"prompt": CODE, "max_tokens": 6, "temperature": 0, "logprobs": 0, "echo": True}
    lp = complete(builtin_server, body)["choices"][0]["logprobs"]
    # the server's BOS is not echoed, so even the prompt's first token is scored (after BOS)
    assert lp["tokens"][0] == "import" and lp["token_logprobs"][0] is not None
    for token, value, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert top == {token: value}


# Kind 2: a stream is the non-streamed response, cut in pieces ------------------------------------

PROMPTS = [CODE, UNICODE, [1, 400, 401, 402, 403, 404]]
GRID = list(itertools.product([False, True], [None, 0, 2], [1, 2], [False, True], [0, 9]))


@pytest.mark.parametrize(("echo", "logprobs", "n", "stop", "max_tokens"), GRID)
def test_stream_equals_non_stream(builtin_server, echo, logprobs, n, stop, max_tokens) -> None:
    i = GRID.index((echo, logprobs, n, stop, max_tokens))
    body = {"prompt": PROMPTS[i % 3], "echo": echo, "logprobs": logprobs, "n": n,
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i}  # fmt: skip
    if stop:  # a stop string from the middle of the unstopped text, so it is held back and cut
        text = complete(builtin_server, {**body, "echo": False, "max_tokens": 9})["choices"][0]
        body["stop"] = [text["text"][3:5] or "\n", "never seen"]
    whole = complete(builtin_server, body)
    streamed = stream_as_response(builtin_server, body)
    assert same_usage(streamed["usage"], whole["usage"])
    assert_same(streamed["choices"], whole["choices"])
    assert len(whole["choices"]) == n
    if echo and isinstance(body["prompt"], str):
        assert all(c["text"].startswith(body["prompt"]) for c in whole["choices"])


@pytest.mark.parametrize("seed", range(4))
def test_stream_equals_non_stream_through_byte_pieces(live_server: str, seed: int) -> None:
    """The tiny random model emits byte pieces, broken characters and stray U+FFFD."""
    body = {"prompt": UNICODE, "echo": True, "logprobs": 3, "n": 2, "max_tokens": 24,
            "temperature": 1.0, "seed": seed}  # fmt: skip
    text = complete(live_server, {**body, "echo": False})["choices"][0]["text"]
    body["stop"] = [text[6:8] or "x"]
    whole = complete(live_server, body)
    streamed = stream_as_response(live_server, body)
    assert_same(streamed["choices"], whole["choices"])
    assert same_usage(streamed["usage"], whole["usage"])
    for choice in whole["choices"]:
        assert_offsets_index_the_text(choice, specials=("<|bos|>", "<|eos|>"))
    if len(text) >= 8:
        assert whole["choices"][0]["finish_reason"] == "stop"


def test_echo_stream_sends_the_prompt_once(builtin_server: str) -> None:
    body = {"prompt": "def fibonacci(n):", "max_tokens": 3, "echo": True, "temperature": 0}
    streamed = stream_as_response(builtin_server, body)["choices"][0]["text"]
    assert streamed.count("def fibonacci(n):") == 1
    assert streamed == complete(builtin_server, body)["choices"][0]["text"]


# Kind 3: every field works or is refused --------------------------------------------------------

REFUSED = [
    ("suffix", "\n# end"),
    ("best_of", 2),
    ("response_format", {"type": "json_object"}),
    ("use_beam_search", True),
    ("guided_json", {"type": "object"}),
    ("guided_choice", ["a", "b"]),
    ("include_stop_str_in_output", True),
    ("prompt_logprobs", 1),
    ("allowed_token_ids", [1, 2]),
    ("skip_special_tokens", False),
    ("truncate_prompt_tokens", 10),
]


@pytest.mark.parametrize(("field", "value"), REFUSED)
def test_known_unimplemented_fields_are_refused_by_name(live_server, field, value) -> None:
    for stream in (False, True):
        r = post(live_server, {"prompt": "x", "max_tokens": 1, "stream": stream, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field
        assert field in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "inert", [{"suffix": None}, {"best_of": 1}, {"logit_bias": {}}, {"use_beam_search": False},
              {"skip_special_tokens": True}, {"response_format": {"type": "text"}}],
)  # fmt: skip
def test_refused_fields_at_their_default_are_accepted(live_server: str, inert: dict) -> None:
    assert post(live_server, {"prompt": "x", "max_tokens": 1, **inert}).status_code == 200


def test_unknown_fields_are_accepted_and_logged_once(tiny_model_dir, tmp_path) -> None:
    from tests.conftest import running_server

    log = tmp_path / "server.log"
    with running_server(tiny_model_dir, log=log) as server:
        for _ in range(3):
            r = post(server.url, {"prompt": "x", "max_tokens": 1, "frobnicate": {"a": 1}})
            assert r.status_code == 200
    assert log.read_text().count("'frobnicate'") == 1


@pytest.mark.parametrize(
    ("options", "param"),
    [({"continuous_usage_stats": True}, "stream_options.continuous_usage_stats"),
     ({"include_usage": True, "made_up": 1}, "stream_options.made_up")],
)  # fmt: skip
def test_unsupported_stream_options_are_refused(live_server: str, options, param) -> None:
    r = post(live_server, {"prompt": "x", "stream": True, "stream_options": options})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_min_tokens_over_max_tokens_is_refused(live_server: str) -> None:
    r = post(live_server, {"prompt": "x", "max_tokens": 2, "min_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"


def test_stream_options_without_stream_is_refused(live_server: str) -> None:
    r = post(live_server, {"prompt": "x", "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_seed_minus_one_means_random(builtin_server: str) -> None:
    body = {"prompt": CODE, "max_tokens": 16, "temperature": 1.0}
    texts = {complete(builtin_server, {**body, "seed": -1})["choices"][0]["text"] for _ in range(4)}
    assert len(texts) > 1
    seeded = {complete(builtin_server, {**body, "seed": 7})["choices"][0]["text"] for _ in range(2)}
    assert len(seeded) == 1
    assert post(builtin_server, {**body, "seed": -2}).status_code == 400


def test_every_prompt_starts_with_bos_unless_told_not_to(live_server: str) -> None:
    """add_special_tokens (default true) puts BOS before text and token prompts alike, unless the
    ids already start with it; the server's BOS is counted in usage but never echoed."""
    body = {"prompt": "x = 1", "max_tokens": 0, "echo": True, "logprobs": 0}
    text = complete(live_server, body)["choices"][0]
    bare = httpx.post(
        f"{live_server}/tokenize", json={"prompt": "x = 1", "add_special_tokens": False}
    )
    ids = bare.json()["tokens"]
    by_ids = complete(live_server, {**body, "prompt": ids})
    bos_first = complete(live_server, {**body, "prompt": [0, *ids]})  # the client's own BOS
    without = complete(live_server, {**body, "add_special_tokens": False})
    lp = text["logprobs"]
    assert lp["tokens"][0] == "x" and lp["token_logprobs"][0] is not None  # scored after BOS
    assert by_ids["choices"][0]["logprobs"] == lp  # lm-eval's two modes score the same
    assert by_ids["usage"]["prompt_tokens"] == len(ids) + 1
    assert bos_first["choices"][0]["logprobs"]["tokens"][0] == "<|bos|>"  # the client's: echoed
    assert bos_first["choices"][0]["logprobs"]["token_logprobs"][1:] == lp["token_logprobs"]
    assert bos_first["usage"]["prompt_tokens"] == len(ids) + 1
    off = without["choices"][0]["logprobs"]
    assert off["tokens"] == lp["tokens"] and off["token_logprobs"][0] is None
    assert without["usage"]["prompt_tokens"] == len(ids)
    spelled = complete(live_server, {**body, "prompt": "<|bos|>x = 1"})  # BOS as text: not twice
    assert spelled["usage"]["prompt_tokens"] == len(ids) + 1


def test_null_means_the_default(live_server: str) -> None:
    """OpenAI's spec lets clients send null for the sampling fields they leave unset."""
    body = {"prompt": CODE, "max_tokens": 6, "seed": 5}
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "echo", "presence_penalty",
                           "frequency_penalty", "top_k", "min_p", "repetition_penalty",
                           "min_tokens", "ignore_eos", "add_special_tokens", "logprobs", "stop",
                           "recurrence_warm_start"))  # fmt: skip
    want = complete(live_server, body)["choices"][0]["text"]
    assert complete(live_server, {**body, **nulls})["choices"][0]["text"] == want
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "seed": 5}
    r = httpx.post(f"{live_server}/v1/chat/completions", timeout=120,
                   json={**chat, "logprobs": None, "add_generation_prompt": None, "n": None})  # fmt: skip
    assert r.status_code == 200, r.text
    assert post(live_server, {"prompt": None}).status_code == 400  # required: null is no prompt


def test_null_on_a_looping_field_keeps_what_the_model_name_stands_for(live_server) -> None:
    """`ID@T5` with `recurrence_depth: null` (a client that sends unset fields as null) runs at
    depth 5, not at the server's default."""
    model = httpx.get(f"{live_server}/v1/models").json()["data"][0]["id"]
    body = {"prompt": CODE, "max_tokens": 2, "model": f"{model}@T5"}  # the default is 3
    for nulls in ({}, {"recurrence_depth": None}, {"recurrence_depth": None, "kv_policy": None,
                                                   "recurrence_exit": None}):  # fmt: skip
        usage = complete(live_server, {**body, **nulls})["usage"]
        assert usage["recurrence"]["mean_depth"] == 5, nulls


def test_a_request_that_bans_every_token_is_refused(live_server: str) -> None:
    """Until min_tokens, stop ids and EOS may not be sampled: if they are the whole vocabulary
    no token can be, and the request is a 400 up front (it was a 500 when sampled, and a banned
    token when greedy)."""
    vocab = httpx.get(f"{live_server}/tokenizer_info").json()["vocab_size"]
    every = {"prompt": "a", "max_tokens": 3, "min_tokens": 2, "stop_token_ids": list(range(vocab))}
    for extra in ({"temperature": 1}, {"temperature": 0}, {"stream": True}):
        r = post(live_server, {**every, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    allowed = [complete(live_server, {**every, "min_tokens": 0}),  # stops at once, as asked
               complete(live_server, {**every, "stop_token_ids": list(range(1, vocab)),
                                      "ignore_eos": True, "temperature": 0})]  # fmt: skip
    assert allowed[0]["choices"][0]["finish_reason"] == "stop"
    assert allowed[1]["usage"]["completion_tokens"] >= 2


def test_a_number_beyond_a_double_is_refused(live_server: str) -> None:
    body = '{"prompt": "a", "max_tokens": 1, "recurrence_exit": {"criterion": "kl", "threshold": 1e400}}'
    r = httpx.post(f"{live_server}/v1/completions", content=body, timeout=60,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "range" in r.json()["error"]["message"], r.text


def test_a_prompt_that_fills_the_context_is_scored_not_continued(live_server: str) -> None:
    """The tiny model's context is 512: BOS + 511 ids fill it. Scoring the full window (lm-eval
    does) works; asking for a completion is a 400 that counts the BOS; any max_tokens that
    fits is clipped to the room left."""
    body = {"prompt": [5] * 511, "max_tokens": 0, "echo": True, "logprobs": 0}
    scored = complete(live_server, body)["choices"][0]["logprobs"]["token_logprobs"]
    assert len(scored) == 511 and all(lp is not None for lp in scored)
    r = post(live_server, {"prompt": [5] * 511, "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert "512 tokens" in error["message"] and "no room" in error["message"]
    r = post(live_server, {"prompt": [5] * 513, "max_tokens": 0})  # over it even without BOS
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_stop_strings_wait_for_min_tokens(live_server: str) -> None:
    body = {"prompt": CODE, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    text = complete(live_server, body)["choices"][0]["text"]
    stop = text[0]  # the first token's text holds it
    early = complete(live_server, {**body, "stop": [stop]})
    assert early["choices"][0]["text"] == "" and early["choices"][0]["finish_reason"] == "stop"
    later = complete(live_server, {**body, "stop": [stop], "min_tokens": 4})
    assert later["usage"]["completion_tokens"] >= 4 and later["choices"][0]["text"][0] == stop
    assert text.startswith(later["choices"][0]["text"])
