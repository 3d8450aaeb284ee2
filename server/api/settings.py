"""Server settings: one typed object, from flags and PARCAE_* environment variables."""

from __future__ import annotations

import argparse
import json
import os
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from parcae_serve.server.api.served_models import parse_presets
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy
from parcae_serve.server.engine.runner import CODA_WAIT
from parcae_serve.server.engine.sequence import Speculation


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PARCAE_", protected_namespaces=())

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    model: str | None = Field(
        None, description="checkpoint directory (default: the built-in model)"
    )
    tokenizer: str | None = Field(
        None, description="directory with tokenizer.json, if the checkpoint has none"
    )
    served_model_name: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="model ids the API answers to, the first one primary (several allowed, as "
        "vLLM's; default: the checkpoint directory's name). Each also answers as ID@T<n> "
        "(recurrence depth n) and ID@PRESET",
    )
    default_depth: int | None = Field(
        None,
        ge=1,
        description="recurrence depth of a request that names none (default: the model's "
        "mean_recurrence)",
    )
    preset: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="named looping settings a request selects by model name ID@NAME: NAME=JSON "
        'of the request\'s looping fields, e.g. fast={"recurrence_depth":2} or '
        'adaptive={"recurrence_depth":12,"recurrence_exit":{"criterion":"kl","threshold":0.01}}; '
        "repeatable",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja2 chat template file (Hugging Face chat_template format) for "
        "/v1/chat/completions (default: the checkpoint's tokenizer_config.json chat_template, "
        "else a plain 'role: content' template for base models)",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CORS: browser origins allowed to call the API ('*' for any); none by "
        "default, so no browser page can use a server it did not open to it",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda when present, else cpu"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights dtype, and the KV cache's unless --kv-cache-dtype says otherwise "
        "(auto: bfloat16 on cuda, float32 on cpu)",
    )
    max_batch: int = Field(64, ge=1, description="sequences computed at once")
    max_context: int | None = Field(None, ge=2, description="context limit (default: the model's)")
    max_depth: int = Field(64, ge=1, description="largest recurrence_depth a request may ask for")
    kv_policy: str = Field(
        "auto",
        description="loop-slot policy of the KV cache: auto | per-loop | shared:K | first:K | "
        "last:K. auto: the policy the checkpoint's calibration.json measured with the fewest "
        "bytes per token within --kv-max-nll-cost (lossy only up to the deepest depth measured "
        "within it), else per-loop (exact)",
    )
    kv_max_nll_cost: float = Field(
        0.005,
        ge=0,
        description="largest held-out NLL cost (0.005 = 0.5%%) of a lossy KV policy that "
        "--kv-policy auto accepts",
    )
    kv_cache_bytes: int | None = Field(
        None, ge=1, description="KV-cache pool size (default: a share of free memory)"
    )
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3"] = Field(
        "auto",
        description="how the KV cache stores K/V (auto: the model's dtype). float16 or bfloat16 "
        "halve the bytes a token's K/V takes, fp8 (= fp8_e4m3: float8 e4m3, saturating at "
        "+-448, no scale) quarters them, so the pool holds more tokens and decode at long "
        "context reads less; attention still computes in the model's dtype (or fp32), and own "
        "K/V are rounded as stored, so compiled and eager decode agree. Lossy: "
        "bench/RESULTS.md has the built-in model's held-out NLL cost of each",
    )
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the model's kernels (default: every core for a model of "
        "16 MiB of weights or more; cores - 1 for a smaller, overhead-bound one, leaving a "
        "core to HTTP). Idle threads spin briefly, then sleep (GOMP_SPINCOUNT=3000 unless it "
        "or OMP_WAIT_POLICY is set), so an oversubscribed machine slows down instead of "
        "collapsing",
    )
    compile: Literal["auto", "off", "inductor", "cudagraphs", "eager"] = Field(
        "auto",
        description="compiled decode path: inductor (torch.compile), cudagraphs (CUDA graphs on "
        "top), off (eager runner only), eager (the graph's code uncompiled, for debugging); "
        "auto = cudagraphs on CUDA, inductor on CPU. Compiling is paid at start-up.",
    )
    compile_depths: str | None = Field(
        None,
        description="comma-separated depths whose decode graphs are compiled at start-up "
        "(default: the default depth); decode at other depths runs eagerly",
    )
    speculative: str = Field(
        "off",
        description="default self-speculative decoding of greedy requests, D:K (draft at D "
        "loops, K tokens per verify pass; requests override it with recurrence_speculative) "
        "or off",
    )
    speculative_max_batch: int = Field(
        1,
        ge=0,
        description="speculate only while at most this many sequences run (measured on 2 CPU "
        "cores: one stream gains, two already lose; batching fills the machine)",
    )
    coda_wait: int = Field(
        CODA_WAIT,
        ge=0,
        description="loops a token that finished its loops early (an exit rule, a shallower "
        "depth) may wait so that tokens finishing meanwhile share its coda pass; eager "
        'decode only (bench/RESULTS.md, "Loop-level scheduling of exits")',
    )
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens started per engine step")
    max_queue: int = Field(256, ge=0, description="waiting requests before 429")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="require 'Authorization: Bearer KEY' on /v1/* (as vLLM: /health, /metrics, /version and "
        "the tokenizer endpoints stay open); "
        "repeatable: any of the keys is accepted",
    )
    api_key_file: str | None = Field(
        None, description="file of accepted API keys, one per line (added to --api-key)"
    )
    max_request_bytes: int = Field(
        8 * 2**20, ge=1, description="largest request body; larger ones get 413 unread"
    )
    drain_grace: float = Field(30.0, ge=0, description="seconds to finish requests on SIGTERM")
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("compile_depths")
    @classmethod
    def _depth_list(cls, value: str | None) -> str | None:
        if value is not None and not all(
            d.strip().isdigit() and int(d) >= 1 for d in value.split(",")
        ):
            raise ValueError("give depths as comma-separated positive integers, e.g. 4,8,12")
        return value

    @field_validator("served_model_name", "allowed_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return env_list(value, split=True)

    @field_validator("preset", "api_key", mode="before")
    @classmethod
    def _item_list(cls, value: object) -> object:
        return env_list(value, split=False)

    @field_validator("served_model_name")
    @classmethod
    def _plain_names(cls, value: list[str] | None) -> list[str] | None:
        if value and any(not name or "@" in name for name in value):
            raise ValueError("model names must be non-empty and without '@' (ID@... selects a "
                             "depth or a preset)")  # fmt: skip
        return value

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value):
            raise ValueError("an API key must not be empty")
        return value

    @field_validator("preset")
    @classmethod
    def _presets(cls, value: list[str]) -> list[str]:
        parse_presets(value)  # raises ValueError naming the bad one
        return value

    @field_validator("api_key_file")
    @classmethod
    def _keys_in_file(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            keys = read_key_file(value)
        except OSError as err:
            raise ValueError(f"cannot read {value}: {err.strerror}") from None
        if not keys:
            raise ValueError(f"{value} holds no key (an unfilled secret must not switch auth off)")
        return value

    @model_validator(mode="after")
    def _default_within_max(self) -> ServerSettings:
        if self.default_depth is not None and self.default_depth > self.max_depth:
            raise ValueError(
                f"--default-depth {self.default_depth} exceeds --max-depth {self.max_depth}"
            )
        return self

    @field_validator("speculative")
    @classmethod
    def _known_speculation(cls, value: str) -> str:
        Speculation.parse(value)  # raises ValueError with the accepted forms
        return value

    @field_validator("kv_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value != "auto":
            LoopSlotPolicy.parse(value)  # raises ValueError with the accepted forms
        return value


def parse_args(argv: list[str] | None = None) -> ServerSettings:
    """Flags override PARCAE_* variables, which override the defaults."""
    parser = argparse.ArgumentParser(
        prog="parcae-serve",
        description="Serve a looped (Parcae) language model with an OpenAI-style API. "
        "Every flag can also be set as PARCAE_<FLAG> (e.g. PARCAE_MAX_DEPTH=32).",
    )
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = f"PARCAE_{name.upper()}"
        default = (
            "" if field.default in (None, PydanticUndefined) else f"default: {field.default}; "
        )
        help_text = f"{field.description} ({default}env {env})"
        if _is_list(field.annotation):  # repeatable, and several values after one flag
            help_text = help_text.replace(f"env {env}", f"env {env} as a JSON list")
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text,
                                action="extend", nargs="+")  # fmt: skip
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)
    given = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        where = f"--{str(first['loc'][0]).replace('_', '-')}: " if first["loc"] else ""
        parser.error(where + first["msg"].removeprefix("Value error, "))


def read_key_file(path: str) -> list[str]:
    """API keys, one per line (blank lines and # comments skipped). OSError if unreadable."""
    lines = Path(path).read_text().splitlines()
    return [k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#")]


def env_list(value: object, split: bool) -> object:
    """A list setting from an environment variable: a JSON list, or one value ("" for none;
    comma-separated values where `split`). Flags arrive as lists already."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [v.strip() for v in text.split(",") if v.strip()] if split else [text]


def _is_list(annotation: object) -> bool:
    return list in (
        typing.get_origin(annotation),
        *map(typing.get_origin, typing.get_args(annotation)),
    )


def default_kv_bytes(device: str) -> int:
    """A share of free memory: half the free GPU memory, or a quarter of RAM up to 2 GiB."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.5)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = 8 * 2**30
    return int(min(2 * 2**30, available // 4))
