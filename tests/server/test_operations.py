"""What operators coming from vLLM expect, over real HTTP: aliases and presets, a default depth,
several API keys, CORS, X-Request-Id, one access-log line per request, labelled metrics, cached
prompt tokens in usage, and a chat template from a file (sandboxed)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from parcae_serve.server.api.served_models import ServedModels, parse_presets
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy
from tests.conftest import running_server
from tests.helpers import wait_for

KEYS = ("key-one", "key-two")
ORIGIN = "http://dashboard.test"
TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}"
    "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
)


@pytest.fixture(scope="module")
def ops(tiny_model_dir: Path, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("ops")
    (tmp / "keys").write_text(f"# operators\n{KEYS[1]}\n\n")
    (tmp / "template.jinja").write_text(TEMPLATE)
    log = tmp / "server.log"
    flags = ["--served-model-name", "alpha", "beta", "--preset", 'fast={"recurrence_depth":1}',
             "--default-depth", "2", "--api-key", KEYS[0], "--api-key-file", str(tmp / "keys"),
             "--allowed-origins", ORIGIN, "--chat-template", str(tmp / "template.jinja"),
             "--kv-policy", "per-loop", "--log-level", "info"]  # fmt: skip
    with running_server(tiny_model_dir, *flags, log=log) as server:
        yield server.url, log


def auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def complete(url: str, body: dict, key: str = KEYS[0], **headers) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", json=body, headers={**auth(key), **headers}, timeout=60
    )


def test_aliases_presets_and_default_depth(ops) -> None:
    url, _ = ops
    cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]}
    assert {"alpha", "beta", "alpha@fast", "alpha@T1", "alpha@T2"} <= set(cards)
    assert cards["alpha"]["recurrence"]["default_depth"] == 2
    assert cards["alpha@fast"] == {**cards["alpha@fast"], "parent": "alpha", "root": "alpha",
                                   "recurrence": {"recurrence_depth": 1}}  # fmt: skip
    for name, depth in (("beta", 2), ("beta@fast", 1), ("alpha@T4", 4), (None, 2)):
        body = {"prompt": "import os\n", "max_tokens": 3, **({"model": name} if name else {})}
        r = complete(url, body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == (name or "alpha")
        assert r.json()["usage"]["recurrence"]["mean_depth"] == depth


def test_every_key_is_accepted_and_no_other(ops) -> None:
    url, _ = ops
    body = {"prompt": "x = 1", "max_tokens": 1}
    assert [complete(url, body, key).status_code for key in KEYS] == [200, 200]
    for wrong in ("key-on", "key-onee", "key-one,key-two", "# operators"):
        r = complete(url, body, wrong)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_cors_for_the_allowed_origin_only(ops) -> None:
    url, _ = ops
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    r = httpx.options(f"{url}/v1/completions", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{url}/v1/completions", headers={**preflight, "Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
    r = complete(url, {"prompt": "x", "max_tokens": 1}, Origin=ORIGIN)
    assert r.headers["access-control-allow-origin"] == ORIGIN


def test_request_ids_and_one_log_line_per_request(ops) -> None:
    url, log = ops
    # sampled without a seed: ignore_eos, so the log line always counts 4 completion tokens
    r = complete(url, {"model": "alpha@T3", "prompt": "def f():", "max_tokens": 4,
                       "ignore_eos": True}, **{"X-Request-Id": "trace-42"})  # fmt: skip
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42"
    fresh = complete(url, {"prompt": "def f():", "max_tokens": 1}, **{"X-Request-Id": "bad\x7fid"})
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["x-request-id"])
    refused = complete(url, {"prompt": "x", "max_tokens": -1}, **{"X-Request-Id": "trace-400"})
    unauthorized = complete(url, {"prompt": "x"}, "nope", **{"X-Request-Id": "trace-401"})
    assert (refused.status_code, unauthorized.status_code) == (400, 401)
    assert refused.headers["x-request-id"] == "trace-400"
    # the access line is written after the response is sent: on a busy machine the client can
    # read the log before the last line is in it
    wait_for(lambda: "req=trace-401 " in log.read_text())
    text = log.read_text()
    line = next(x for x in text.splitlines() if "req=trace-42 " in x)
    assert re.search(r"POST /v1/completions 200 prompt=\d+ cached=0 completion=4 depth=3\.00 "
                     r"model=alpha@T3 \d+\.\dms$", line), line  # fmt: skip
    assert "req=trace-400 POST /v1/completions 400" in text
    assert "req=trace-401 POST /v1/completions 401" in text


def test_cached_prompt_tokens_in_usage_and_metrics(ops) -> None:
    url, _ = ops
    prompt = "import os\nimport sys\n" * 12  # several full 16-token blocks
    first = complete(url, {"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()["usage"]
    again = complete(url, {"prompt": prompt, "max_tokens": 2, "temperature": 0}).json()["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < again["prompt_tokens"]
    metrics = httpx.get(f"{url}/metrics").text
    hits = re.search(r'^parcae_prefix_cache_hits_total\{model_name="alpha"\} (\S+)$', metrics, re.M)
    assert hits and float(hits[1]) >= cached  # counted in tokens, as vLLM does
    finished = r'^parcae_requests_total\{finished_reason="length",model_name="alpha"\} '
    assert re.search(finished, metrics, re.M)


def test_chat_template_from_a_file(ops) -> None:
    url, _ = ops
    messages = [{"role": "user", "content": "def f():"}]
    body = {"model": "beta", "messages": messages, "max_tokens": 3, "temperature": 0}
    chat = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=60).json()
    plain = complete(url, {"prompt": "[user] def f():\n>", "max_tokens": 3, "temperature": 0,
                           "add_special_tokens": False}).json()  # fmt: skip
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    body["messages"] = [*messages, {"role": "tool", "content": "42"}]
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(), timeout=60)
    assert r.status_code == 400 and "no tools here" in r.json()["error"]["message"]


def test_a_template_cannot_reach_python(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The sandbox refuses attribute escapes: the request gets 400, the server keeps serving."""
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with running_server(tiny_model_dir, "--chat-template", evil) as server:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_client_text_cannot_forge_log_lines(ops) -> None:
    url, log = ops
    complete(
        url,
        {"model": "alpha\nreq=FORGED POST /x 200", "prompt": "x"},
        **{"X-Request-Id": "trace-f1"},
    )
    httpx.get(f"{url}/v1%0Areq=FORGED2%20GET%20/x%20200", headers=auth())
    spaced = complete(url, {"prompt": "x", "max_tokens": 1}, **{"X-Request-Id": "a b=c"})
    assert spaced.headers["x-request-id"] != "a b=c"  # no spaces: no extra log fields
    usual = complete(url, {"prompt": "x", "max_tokens": 1}, **{"X-Request-Id": "req_01H/x+Y="})
    assert usual.headers["x-request-id"] == "req_01H/x+Y="
    lines = log.read_text().splitlines()
    assert not [x for x in lines if "req=FORGED" in x.split(" parcae.access ")[-1][:12]]
    assert any(
        "req=trace-f1 POST /v1/completions 404 model=alpha%0Areq%3DFORGED" in x for x in lines
    )


def test_a_client_that_leaves_mid_body_is_logged_as_499(ops) -> None:
    """Nothing was answered because the client left, not because the server failed."""
    url, log = ops
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            "X-Request-Id: left-early\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n")  # fmt: skip
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.sendall(head.encode() + b'{"prompt":')
        time.sleep(0.3)
    logged = lambda: [x for x in log.read_text().splitlines() if "req=left-early " in x]  # noqa: E731
    assert wait_for(lambda: bool(logged()))
    assert " POST /v1/completions 499 " in logged()[0]


def test_a_preset_whose_kv_policy_needs_more_slots_is_refused_at_start() -> None:
    """Every request to `@pl` would get a 400 on a `shared:1` server: a start-up error."""
    presets = parse_presets(['pl={"kv_policy":"per-loop"}', 'one={"kv_policy":"shared:1"}'])
    models = ServedModels(["m"], default_depth=4, max_depth=16, mean_recurrence=4,
                          presets=presets)  # fmt: skip
    with pytest.raises(ValueError, match=r"--preset pl: kv_policy per-loop .* depth 4"):
        models.check_presets(True, True, LoopSlotPolicy.parse("shared:1"))
    models.check_presets(True, True, LoopSlotPolicy.parse("per-loop"))  # room for either
    shallow = parse_presets(['pl={"kv_policy":"per-loop","recurrence_depth":1}'])
    ServedModels(["m"], 4, 16, 4, shallow).check_presets(
        True, True, LoopSlotPolicy.parse("shared:1")
    )
