"""/v1/chat/completions: messages -> prompt (a sandboxed Jinja2 chat template), then the completions
service; its pieces -> chat responses and `chat.completion.chunk` events.

Templates are Hugging Face's `chat_template` format (the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception`, and `tojson`), rendered in
Jinja2's immutable sandbox as transformers does, so a template from a checkpoint cannot reach
Python. Where the template comes from: `--chat-template FILE`, else the checkpoint's
`tokenizer_config.json` `chat_template` (or `chat_template.jinja`), else DEFAULT_TEMPLATE.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment

from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.api.completions import (
    APIError,
    Choice,
    CompletionService,
    Piece,
)
from parcae_serve.server.api.protocol import (
    CHAT_REFUSED_FIELDS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionRequest,
    GenerationFields,
    Logprobs,
    TokenLogprob,
    TopLogprob,
)

# For base models, which have no template: each message as "role: content" and a blank line,
# then "assistant:" to answer. Documented in the README.
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The fields a chat request passes to the completions service unchanged.
SHARED_FIELDS = tuple(GenerationFields.model_fields)


# variables the server sets, and what a client may not slip in past the refused fields
RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                             "raise_exception", "strftime_now", "tools", "documents"})  # fmt: skip


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter (its signature), unescaped for HTML as templates expect."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


class TemplateRaised(Exception):
    """`raise_exception(message)` called by a template: the messages are not acceptable."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


class ChatTemplate:
    def __init__(self, source: str, tokenizer: Tokenizer) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )  # transformers' environment: {% break %} / {% continue %}, tojson, strftime_now
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.source = source
        self.template = env.from_string(source)  # a syntax error fails at start-up
        self.bos = tokenizer.special_text(tokenizer.bos_id) or ""
        self.eos = tokenizer.special_text(tokenizer.eos_id) or ""

    @classmethod
    def load(cls, given: str | None, model_dir: Path, tokenizer: Tokenizer) -> ChatTemplate:
        """--chat-template (a file, or the template itself), else the checkpoint's, else the
        plain default."""
        if given is not None:
            path = Path(given)
            if path.is_file():
                return cls(path.read_text(), tokenizer)
            if "{{" in given or "{%" in given:
                return cls(given, tokenizer)
            raise FileNotFoundError(f"--chat-template {given}: no such file")
        return cls(checkpoint_template(model_dir) or DEFAULT_TEMPLATE, tokenizer)

    def render(self, req: ChatCompletionRequest) -> str:
        messages = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in req.messages]
        kwargs = req.chat_template_kwargs or {}
        if reserved := RESERVED_KWARGS & set(kwargs):
            raise APIError(400, f"chat_template_kwargs may not set {sorted(reserved)}",
                           param="chat_template_kwargs")  # fmt: skip
        variables = {**kwargs, "messages": messages,
                     "add_generation_prompt": req.add_generation_prompt,
                     "bos_token": self.bos, "eos_token": self.eos}  # fmt: skip
        try:
            return self.template.render(**variables)
        except TemplateRaised as err:
            raise APIError(400, f"chat template: {err}", param="messages") from None
        except Exception as err:  # sandbox violations and any error the template's code raises
            raise APIError(400, f"chat template failed: {type(err).__name__}: {err}",
                           param="messages") from None  # fmt: skip


def checkpoint_template(model_dir: Path) -> str | None:
    """The template a Hugging Face checkpoint ships: tokenizer_config.json's `chat_template`
    (a string, or a list of named templates: "default"), or chat_template.jinja."""
    config = model_dir / "tokenizer_config.json"
    if config.exists():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else None


class ChatService:
    def __init__(self, service: CompletionService, template: ChatTemplate) -> None:
        self.service, self.template = service, template

    def completion_request(self, req: ChatCompletionRequest) -> CompletionRequest:
        """The same generation as a completions request: the rendered prompt (its special
        tokens are the template's, so none is added), logprobs as the chat fields ask."""
        for name, value in (req.model_extra or {}).items():
            if name in CHAT_REFUSED_FIELDS and value not in CHAT_REFUSED_FIELDS[name]:
                raise APIError(400, f"{name} is not supported by this server", param=name,
                               code="unsupported_parameter")  # fmt: skip
        for m, message in enumerate(req.messages):
            if part := message.unreadable_part():
                raise APIError(400, f"{part[1]} content parts are not supported: this model "
                               "reads text only", param=f"messages[{m}].content[{part[0]}]",
                               code="unsupported_parameter")  # fmt: skip
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        fields = {
            name: getattr(req, name) for name in SHARED_FIELDS if name in req.model_fields_set
        }
        extra = {k: v for k, v in (req.model_extra or {}).items() if k not in CHAT_REFUSED_FIELDS}
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        ours = {
            "prompt": self.template.render(req),
            "max_tokens": max_tokens,
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
            "return_tokens_as_token_ids": True,  # ids, named here: text and exact bytes per token
            "add_special_tokens": False,  # the template wrote the special tokens
        }
        return CompletionRequest(**{**extra, **fields, **ours})

    async def complete(
        self, req: ChatCompletionRequest, record: dict | None = None
    ) -> ChatCompletionResponse:
        creq = self.completion_request(req)
        results, usage = await self.service.run(creq, record)
        top, as_ids = req.top_logprobs or 0, req.return_tokens_as_token_ids
        return ChatCompletionResponse(
            id=self.service.response_id(record, "chatcmpl"),
            model=req.model or self.service.limits.model_name,
            choices=[ChatChoice(index=r.choice.index, message=AssistantMessage(content=r.text),
                                logprobs=self._logprobs(r.logprobs, top, as_ids),
                                finish_reason=r.choice.finish_reason) for r in results],
            usage=usage,
        )  # fmt: skip

    async def stream(
        self, req: ChatCompletionRequest, record: dict | None = None
    ) -> AsyncIterator[str]:
        """`chat.completion.chunk` events: each choice opens with `delta: {role: assistant}`,
        then content deltas; its last chunk has the finish_reason; `[DONE]` ends the stream."""
        creq = self.completion_request(req)
        choices = await self.service.start(creq)
        frame = {"id": self.service.response_id(record, "chatcmpl"),
                 "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": req.model or self.service.limits.model_name,
                 "system_fingerprint": None}  # fmt: skip
        opened: set[int] = set()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_slot = {"usage": None} if include_usage else {}  # OpenAI: null until the last event
        top, as_ids = req.top_logprobs or 0, req.return_tokens_as_token_ids

        def chunk(choice: Choice, piece: Piece) -> list[dict]:
            bodies = []
            if choice.index not in opened:
                opened.add(choice.index)
                delta = {"role": "assistant", "content": ""}
                bodies.append({**frame, **usage_slot, "choices": [{"index": choice.index, "delta": delta,
                                                     "logprobs": None, "finish_reason": None}]})  # fmt: skip
            logprobs = self._logprobs(piece.logprobs, top, as_ids)
            if piece.text or logprobs or piece.finish_reason:
                delta = {"content": piece.text} if piece.text else {}
                bodies.append({**frame, **usage_slot, "choices": [{
                    "index": choice.index, "delta": delta,
                    "logprobs": logprobs.model_dump() if logprobs else None,
                    "finish_reason": piece.finish_reason}]})  # fmt: skip
            return bodies

        return self.service.events(choices, req.n, chunk, frame if include_usage else None, record)

    def _logprobs(self, logp: Logprobs | None, top: int, as_ids: bool) -> ChatLogprobs | None:
        """Completions-style logprobs (named `token_id:<id>`) -> chat's `content` list: each
        token's text (or its `token_id:<id>` name when asked) and its exact bytes."""
        if logp is None:
            return None
        content = []
        for name, lp, alternatives, depth in zip(logp.tokens, logp.token_logprobs,
                                                 logp.top_logprobs, logp.depths, strict=True):  # fmt: skip
            ranked = sorted((alternatives or {}).items(), key=lambda kv: -kv[1])[:top]
            content.append(TokenLogprob(
                **self._token(name, as_ids), logprob=lp, depth=depth,
                top_logprobs=[TopLogprob(**self._token(t, as_ids), logprob=v) for t, v in ranked],
            ))  # fmt: skip
        return ChatLogprobs(content=content)

    def _token(self, name: str, as_ids: bool) -> dict:
        token_id = int(name.removeprefix("token_id:"))
        tokenizer = self.service.tokenizer
        shown = name if as_ids else tokenizer.token_text(token_id)
        return {"token": shown, "bytes": list(tokenizer.token_bytes(token_id))}
