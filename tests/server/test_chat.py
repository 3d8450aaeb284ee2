"""/v1/chat/completions over real HTTP with the official openai SDK: OpenAI's schema (checked by the
SDK's own types), streaming that equals the non-streamed answer, the template, depth by name."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

MESSAGES = [{"role": "system", "content": "You write Python."},
            {"role": "user", "content": "def parse(text):"}]  # fmt: skip


@pytest.fixture(scope="module")
def client(live_server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def raw_chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_chat_response_matches_openai_schema(live_server: str, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_completion_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 3}  # fmt: skip
    r = raw_chat(live_server, body)
    assert r.status_code == 200, r.text
    out = ChatCompletion.model_validate(r.json())  # the SDK's types, not its lenient construct
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 10 == len(choice.logprobs.content)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 10
    joined = b"".join(bytes(t.bytes) for t in choice.logprobs.content)
    assert joined.decode("utf-8", "replace") == choice.message.content  # exact bytes per token

    for t in choice.logprobs.content:
        assert len(t.top_logprobs) == 3
        assert [a.logprob for a in t.top_logprobs] == sorted(
            (a.logprob for a in t.top_logprobs), reverse=True
        )
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-6  # greedy picks the most likely


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model: str) -> None:
    kw = {
        "model": model,
        "messages": MESSAGES,
        "max_completion_tokens": 12,
        "temperature": 0.8,
        "seed": 7,
    }
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )
    assert len({c.id for c in chunks}) == 1


def test_chat_prompt_is_the_default_template(live_server: str, model: str) -> None:
    """A base model without a template gets '<bos>role: content' blocks and 'assistant:'."""
    chat = raw_chat(
        live_server, {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    ).json()
    prompt = "<|bos|>system: You write Python.\n\nuser: def parse(text):\n\nassistant:"
    plain = httpx.post(f"{live_server}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                       "temperature": 0, "add_special_tokens": False}, timeout=60).json()  # fmt: skip
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


def test_depth_by_model_name_in_chat_and_completions(client: openai.OpenAI, model: str) -> None:
    chat = client.chat.completions.create(model=f"{model}@T2", messages=MESSAGES, max_tokens=4)
    assert chat.model == f"{model}@T2"
    assert chat.usage.model_extra["recurrence"]["mean_depth"] == 2.0
    done = client.completions.create(model=f"{model}@T5", prompt="import os\n", max_tokens=4)
    assert done.usage.model_extra["recurrence"]["mean_depth"] == 5.0
    explicit = client.completions.create(model=f"{model}@T5", prompt="import os\n", max_tokens=4,
                                         extra_body={"recurrence_depth": 3})  # fmt: skip
    assert explicit.usage.model_extra["recurrence"]["mean_depth"] == 3.0  # the field wins
    listed = {m.id for m in client.models.list().data}
    assert {model, f"{model}@T1", f"{model}@T2"} <= listed


@pytest.mark.parametrize(
    ("suffix", "status"), [("@T0", 404), ("@fast", 404), ("@T999", 400), ("x", 404)]
)
def test_bad_model_names_are_refused(
    live_server: str, model: str, suffix: str, status: int
) -> None:
    r = raw_chat(live_server, {"model": model + suffix, "messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] in ("model", "recurrence_depth")


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
     ({"messages": []}, "messages"),
     ({"top_logprobs": 2}, "top_logprobs"),
     ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
     ({"response_format": {"type": "json_object"}}, "response_format")],
)  # fmt: skip
def test_chat_refuses_what_it_cannot_do(
    live_server: str, model: str, extra: dict, param: str
) -> None:
    r = raw_chat(live_server, {"model": model, "messages": MESSAGES, "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"] or "").startswith(param)


@pytest.mark.parametrize(
    "part",
    [{"type": "image_url", "image_url": {"url": "data:,"}},
     {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
     {"type": "refusal", "refusal": "no"}],
)  # fmt: skip
def test_non_text_content_parts_are_refused_as_unsupported(
    live_server: str, model: str, part: dict
) -> None:
    """An image or audio part is a feature this model lacks, not a malformed body: the 400 says
    which part and why (it said "Input should be a valid string"), so a client can fall back."""
    content = [{"type": "text", "text": "look:"}, part]
    r = raw_chat(live_server, {"model": model, "max_tokens": 2,
                               "messages": [{"role": "user", "content": content}]})  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_parameter"
    assert error["param"] == "messages[0].content[1]" and part["type"] in error["message"]


def test_a_text_part_without_text_is_a_validation_error(live_server: str, model: str) -> None:
    content = [{"type": "text"}]
    r = raw_chat(live_server, {"model": model, "max_tokens": 2,
                               "messages": [{"role": "user", "content": content}]})  # fmt: skip
    assert r.status_code == 400, r.text  # malformed, not a missing feature
    assert r.json()["error"]["code"] != "unsupported_parameter"


@pytest.mark.parametrize("obfuscate", [False, True])
def test_stream_options_include_obfuscation_is_accepted(
    client: openai.OpenAI, model: str, obfuscate: bool
) -> None:
    """The openai SDK's `include_obfuscation` (OpenAI's padding against length side channels)
    was a 400 "Extra inputs are not permitted", even at false."""
    options = {"include_usage": True, "include_obfuscation": obfuscate}
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                                 max_completion_tokens=3, stream_options=options))  # fmt: skip
    assert chunks[-1].usage.completion_tokens == 3


def test_fields_the_chat_endpoint_sets_itself_cannot_collide(live_server: str, model: str) -> None:
    """Found by the schema fuzzer: a client's return_tokens_as_token_ids or stray `prompt` must
    not reach the completions request twice (a 500)."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2, "logprobs": True,
            "return_tokens_as_token_ids": True, "prompt": "ignored", "add_special_tokens": True}  # fmt: skip
    r = raw_chat(live_server, body)
    assert r.status_code == 200, r.text
    assert all(
        t["token"].startswith("token_id:") for t in r.json()["choices"][0]["logprobs"]["content"]
    )


def test_template_environment_matches_transformers() -> None:
    from parcae_serve.model.loading import builtin_checkpoint
    from parcae_serve.model.tokenizer import Tokenizer
    from parcae_serve.server.api.chat import ChatTemplate
    from parcae_serve.server.api.completions import APIError
    from parcae_serve.server.api.protocol import ChatCompletionRequest

    tok = Tokenizer.from_dir(builtin_checkpoint())
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": parts}, {"role": "user", "content": "é"}]
    )
    loop = (
        "{% for m in messages %}{{ m.content | tojson(ensure_ascii=False) }}{% break %}{% endfor %}"
    )
    assert ChatTemplate(loop, tok).render(req) == '"a\\nb"'  # parts joined by newlines, as vLLM
    assert ChatTemplate("{{ strftime_now('%Y') | length }}", tok).render(req) == "4"
    for bad in (
        "{{ 1 / 0 }}",
        "{{ range(10**9) | list | length }}",
        "{{ ''.__class__.__mro__ }}x{{ [].append(1) }}",
    ):
        with pytest.raises(APIError) as err:
            ChatTemplate(bad, tok).render(req)
        assert err.value.status == 400
    sneaky = req.model_copy(update={"chat_template_kwargs": {"tools": [{"type": "function"}]}})
    with pytest.raises(APIError):
        ChatTemplate("{{ tools }}", tok).render(sneaky)
