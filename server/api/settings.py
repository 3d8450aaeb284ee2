"""Server settings: one typed object, from flags and PARCAE_* environment variables."""

from __future__ import annotations

import argparse
import os
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from parcae_serve.server.engine.kv_cache import LoopSlotPolicy


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
    served_model_name: str | None = Field(
        None, description="model id in the API (default: dir name)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="cuda when present, else cpu"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and cache dtype (auto: bfloat16 on cuda, float32 on cpu)"
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
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the model's kernels (default: every core for a model of "
        "64 MiB of weights or more, which streams them from memory every loop; cores - 1 for a "
        "smaller, overhead-bound one, leaving a core to HTTP). Threads wait passively "
        "(OMP_WAIT_POLICY=PASSIVE unless set), so an oversubscribed machine slows down instead "
        "of collapsing",
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
    prefill_chunk: int = Field(256, ge=1, description="prompt tokens started per engine step")
    max_queue: int = Field(256, ge=0, description="waiting requests before 429")
    api_key: str | None = Field(
        None,
        description="require 'Authorization: Bearer KEY' (all but /health, /metrics, /version)",
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
        default = "" if field.default is None else f"default: {field.default}; "
        help_text = f"{field.description} ({default}env {env})"
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text)
    given = vars(parser.parse_args(argv))
    try:
        return ServerSettings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        parser.error(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}")


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
