"""OpenAI's logit_bias over HTTP: biases steer sampling, reported logprobs stay the model's."""

from __future__ import annotations

import httpx
import pytest

PROMPT = [5, 6, 7, 8]


def complete(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "temperature": 0, "logprobs": 2,
                         "return_tokens_as_token_ids": True, **body})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]


def ids(logprobs: dict) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]


def test_a_large_bias_forces_a_token_and_logprobs_stay_unbiased(live_server: str) -> None:
    forced = 42
    plain = complete(live_server, max_tokens=4)
    biased = complete(live_server, max_tokens=4, logit_bias={str(forced): 100})
    assert ids(biased) == [forced] * 4
    first = biased["token_logprobs"][0]
    assert first < -0.5  # the model's own logprob of the forced token, not ~0 after the bias
    assert ids(plain)[0] != forced


def test_a_negative_bias_bans_the_greedy_choice(live_server: str) -> None:
    top = ids(complete(live_server, max_tokens=1))[0]
    assert ids(complete(live_server, max_tokens=1, logit_bias={str(top): -100}))[0] != top


def test_bias_reaches_sampled_rows_too(live_server: str) -> None:
    out = complete(live_server, max_tokens=3, temperature=1.0, seed=3, logit_bias={"17": 100})
    assert ids(out) == [17, 17, 17]


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {"999999": 1}, {"3": 101}, {"3": -200},
                                  {"²": 1}, {"１": 1}, {"٣": 1}, {"": 1}, {"1.0": 1}])  # fmt: skip
def test_bad_bias_is_refused_naming_the_field(live_server: str, bias: dict) -> None:
    r = httpx.post(f"{live_server}/v1/completions", timeout=60,
                   json={"prompt": "x", "max_tokens": 1, "logit_bias": bias})  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


def test_a_refused_bias_leaves_the_connection_open(live_server: str) -> None:
    """A key str.isdigit takes but int() refuses ("²") was a 500 that dropped the keep-alive
    connection; it is a 400 like any other, and the same connection serves the next request."""
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            r = client.post(f"{live_server}/v1/chat/completions",
                            json={"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 1, "logit_bias": {"²": 1}})  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
