"""Wire types of the OpenAI-style API (legacy completions as vLLM serves it) + looping fields."""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RecurrenceExitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    criterion: Literal["kl", "residual", "learned", "auto"] = Field(
        description="kl: successive loops' next-token distributions; residual: relative state "
        "change; learned: the checkpoint's exit probe (parcae calibrate), threshold = the "
        "probability that more loops would not help; auto: the fastest measured setting (depth "
        "and rule) within max_nll_cost of the best measured NLL"
    )
    threshold: float | None = Field(default=None, ge=0)
    max_nll_cost: float | None = Field(
        default=None, ge=0, description="auto only: relative NLL cost allowed (0.01 = 1%)"
    )
    min_depth: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> RecurrenceExitSpec:
        if self.criterion == "auto":
            if self.max_nll_cost is None:
                raise ValueError("criterion auto needs max_nll_cost")
            if self.threshold is not None:
                raise ValueError("criterion auto chooses its own threshold; send max_nll_cost only")
        elif self.threshold is None:
            raise ValueError(f"criterion {self.criterion} needs a threshold")
        elif self.max_nll_cost is not None:
            raise ValueError("max_nll_cost is for criterion auto only")
        if self.criterion == "learned" and self.threshold > 1:
            raise ValueError("a learned exit's threshold is a probability in [0, 1]")
        return self


class SpeculativeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    draft_depth: int = Field(
        ge=1, description="loops of the draft (below the request's recurrence depth)"
    )
    tokens: int = Field(ge=2, le=16, description="tokens drafted per verify pass")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; refused when true (see CompletionService)
    # OpenAI's: random padding on stream events against length side channels; the openai SDK
    # sends it. Accepted either way; this server sends no padding
    include_obfuscation: bool = True


# Known OpenAI / vLLM completion fields this server does not implement, with the values that mean
# "not used": any other value is refused with 400 naming the field, so clients can fall back.
REFUSED_FIELDS: dict[str, tuple] = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "response_format": (None, {"type": "text"}),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "logits_processors": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "guided_decoding_backend": (None,),
    "guided_whitespace_pattern": (None,),
    "structured_outputs": (None,),
    "prompt_embeds": (None,),
    "priority": (None, 0),
    "return_token_ids": (None, False),
    "cache_salt": (None,),
    "kv_transfer_params": (None,),
    "vllm_xargs": (None,),
}


def _list_of(item: object) -> object:
    """A list that stops at its first bad item: the union below tries each shape in turn, and a
    600k-token prompt must not collect 600k errors for the shapes it is not (on the event loop)."""
    return Annotated[list[item], Field(fail_fast=True)]


Prompt = Union[str, _list_of(str), _list_of(int), _list_of(_list_of(int))]  # noqa: UP007


@functools.cache
def _null_is_unset(model: type[BaseModel]) -> frozenset[str]:
    """The fields of `model` for which an explicit null means what leaving them out means:
    those with a default whose type does not admit None, and those whose default is None
    (max_tokens, default 16, keeps its null: no limit)."""
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if not field.is_required()
        and (type(None) not in get_args(field.annotation) or field.default is None)
    )


class GenerationFields(BaseModel):
    """What completions and chat requests share: sampling (OpenAI's and vLLM's extensions) and
    the looping fields. Fields not declared are kept in `model_extra`: the service refuses the
    known ones it does not implement (REFUSED_FIELDS) and logs the others once as ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-1, le=2**62, description="-1: random")
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="token id (as a string) -> bias in [-100, 100] added to its logit"
    )
    user: str | None = None
    # vLLM's sampling extensions
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, ge=0.01, le=10)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    return_tokens_as_token_ids: bool = False
    # looping fields
    recurrence_depth: int | None = Field(default=None, ge=1)
    recurrence_exit: RecurrenceExitSpec | None = None
    recurrence_warm_start: bool = False
    recurrence_speculative: SpeculativeSpec | Literal[False] | None = Field(
        default=None,
        description="self-speculative decoding: draft at draft_depth loops, verify at the full "
        "depth (same output); false: off; absent: the server's --speculative",
    )
    kv_policy: str | None = None  # per-request loop-slot policy, if no more slots than the server's

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit null means the field is unset: OpenAI's spec declares these fields
        nullable (temperature, top_p, n, stream, ...) and clients send nulls for what they leave
        unset; vLLM reads them as unset too. Dropped here, so a null is not "set" either: a
        depth or preset the model name stands for (`ID@T12`) still applies."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in _null_is_unset(cls)}


class CompletionRequest(GenerationFields):
    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    add_special_tokens: bool = True


class SpeculativeUsage(BaseModel):
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float


class RecurrenceUsage(BaseModel):
    mean_depth: float
    total_loops: int
    speculative: SpeculativeUsage | None = Field(
        default=None,
        description="present when the request asked for speculative decoding (0 drafts: no "
        "round ran, e.g. greedy under load or too few tokens left)",
        exclude_if=lambda value: value is None,  # clients that know only the two above keep working
    )


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose K/V the prefix cache served")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    recurrence: RecurrenceUsage


class Logprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    depths: list[int | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str = Field(description="the served model this name runs")
    parent: str | None = Field(None, description="for ID@T<n> and ID@PRESET: ID")
    max_model_len: int
    recurrence: dict[str, Any] = Field(
        description="the looping settings this name stands for; on the served model's own "
        "ids also its architecture, KV policy and measured compute-quality table"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "failed"]
    detail: str | None = None


class Version(BaseModel):
    version: str


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class TokenizerInfo(BaseModel):
    """What Hugging Face's tokenizer_config.json says, as vLLM's /tokenizer_info serves it (lm-eval's
    remote tokenizer reads bos/eos/pad and the chat template from here)."""

    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool = Field(description="the server starts every prompt with BOS")
    add_eos_token: bool = False
    model_max_length: int
    vocab_size: int
    chat_template: str


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]


# Chat completions (OpenAI's /v1/chat/completions as vLLM serves it) -----------------------------
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class OtherPart(BaseModel):
    """A content part this text-only server cannot read (image_url, input_audio, file, ...):
    accepted by the schema so that the refusal can name it (`ChatMessage.unreadable_part`)."""

    model_config = ConfigDict(extra="allow")
    type: str

    @field_validator("type")
    @classmethod
    def _not_text(cls, value: str) -> str:
        if value == "text":  # a text part TextPart refused is malformed, not unsupported
            raise ValueError("a text part needs 'text', a string")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the template
    role: str
    content: str | list[TextPart | OtherPart] | None = None

    def unreadable_part(self) -> tuple[int, str] | None:
        """(index, type) of the first content part that is not text, if any."""
        if isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if not isinstance(part, TextPart):
                    return i, part.type
        return None

    def text(self) -> str:
        """The content as one string; text parts joined by newlines, as vLLM joins them."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""


# Chat fields that only a model with tools, images or structured output could honour: refused
# with 400 (naming the field) unless they hold a value meaning "not used".
CHAT_REFUSED_FIELDS: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "continue_final_message": (None, False),
    "documents": (None, []),
    "echo": (None, False),
}


class ChatCompletionRequest(GenerationFields):
    """The chat fields; the shared ones mean what they mean for completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0, description="deprecated by OpenAI")
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]
    depth: int | None = Field(None, description="loops this token ran (this server's addition)")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None
    tool_calls: list = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
