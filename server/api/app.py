"""The application: load the checkpoint, build the engine, serve the routes, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from parcae_serve.model.exit_probe import load_exit_probe
from parcae_serve.model.loading import builtin_checkpoint, load_checkpoint
from parcae_serve.model.parcae import Parcae
from parcae_serve.model.tokenizer import Tokenizer
from parcae_serve.server.api.access_log import AccessLog
from parcae_serve.server.api.chat import ChatService, ChatTemplate
from parcae_serve.server.api.completions import CompletionService, ServingLimits
from parcae_serve.server.api.frontier import Frontier
from parcae_serve.server.api.gate import RequestGate
from parcae_serve.server.api.routes import InternalErrors, install_error_handlers, router
from parcae_serve.server.api.served_models import ServedModels, parse_presets
from parcae_serve.server.api.settings import ServerSettings, default_kv_bytes, read_key_file
from parcae_serve.server.api.state import ServerState
from parcae_serve.server.api.text import longest_token_chars
from parcae_serve.server.engine.engine import Engine, EngineConfig
from parcae_serve.server.engine.kv_cache import LoopSlotPolicy, choose_policy
from parcae_serve.server.engine.metrics import Metrics
from parcae_serve.server.engine.sampling import SamplingParams
from parcae_serve.server.engine.scheduler import SchedulerConfig
from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, Speculation

log = logging.getLogger("parcae.serve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --kv-cache-dtype's names (vLLM's: fp8 is e4m3) beside the weights' dtypes
KV_CACHE_DTYPES = {**DTYPES, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def resolve_device(settings: ServerSettings) -> tuple[str, torch.dtype]:
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = settings.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, DTYPES[dtype]


def load_tokenizer(model_dir: Path, tokenizer_dir: str | None) -> Tokenizer:
    for candidate in [model_dir, Path(tokenizer_dir)] if tokenizer_dir else [model_dir]:
        if (candidate / "tokenizer.json").exists():
            return Tokenizer.from_dir(candidate)
    where = f"{model_dir} or {tokenizer_dir}" if tokenizer_dir else str(model_dir)
    raise FileNotFoundError(f"no tokenizer.json in {where}; pass --tokenizer DIR")


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def depth_table(model_dir: Path, calibration: dict | None) -> dict | None:
    """The loss-by-depth table: calibration's (already read), else training.json's."""
    for data in (calibration, read_json(model_dir / "training.json")):
        if data and "loss_by_depth" in data:
            return {k: data[k] for k in ("loss_by_depth", "fit", "adaptive") if k in data}
    return None


def kv_policy(settings: ServerSettings, calibration: dict | None, default_depth: int):
    """The KV policy in force and why: as set, or (auto) what the checkpoint's calibration
    measured within the NLL bound (per-loop when nothing was measured)."""
    if settings.kv_policy != "auto":
        return LoopSlotPolicy.parse(settings.kv_policy), "set by --kv-policy"
    return choose_policy(calibration, settings.kv_max_nll_cost, default_depth)


# Measured on 2 cores over HTTP (bench/RESULTS.md): a 5 MiB model (the reference shape) runs
# 1.1-1.2x faster on one kernel thread than on two, the 33 MiB built-in 1.1x (one stream) and
# 1.2x (32 streams) faster on two, a 270 MiB one needs every core's bandwidth.
MANY_THREADS_BYTES = 16 * 2**20


def kernel_threads(model: Parcae, cores: int) -> int:
    """Default CPU kernel threads: every core, except for a model so small that decode is
    overhead-bound, where syncing threads at every kernel costs more than they add: cores - 1,
    leaving a core to HTTP."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return cores if weight_bytes >= MANY_THREADS_BYTES else max(1, cores - 1)


def compile_mode(setting: str, device: str) -> str:
    """The compiled decode path for `--compile`: auto = CUDA graphs on CUDA, inductor on CPU."""
    if setting != "auto":
        return setting
    return "cudagraphs" if device == "cuda" else "inductor"


def served_names(settings: ServerSettings) -> list[str]:
    """The model ids the API answers to, primary first: --served-model-name, else the
    checkpoint directory's name."""
    if settings.served_model_name:
        return list(dict.fromkeys(settings.served_model_name))
    return [(Path(settings.model) if settings.model else builtin_checkpoint()).name]


def build(state: ServerState) -> None:
    """Load everything (blocking; runs in a worker thread while /health says 503)."""
    s = state.settings
    model_dir = Path(s.model) if s.model else builtin_checkpoint()
    device, dtype = resolve_device(s)
    tokenizer = load_tokenizer(model_dir, s.tokenizer)
    template = ChatTemplate.load(s.chat_template, model_dir, tokenizer)  # fails before compiling
    model: Parcae = load_checkpoint(model_dir, device=device, dtype=dtype)
    threads = None
    if device == "cpu":  # before compiling: compiled kernels are specialised to the count
        threads = s.threads or kernel_threads(model, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        log.info("kernel threads: %d", threads)
    cfg = model.cfg
    max_context = min(s.max_context or cfg.block_size, cfg.block_size)
    default_depth = s.default_depth or min(cfg.mean_recurrence, s.max_depth)
    calibration = read_json(model_dir / "calibration.json")
    policy, policy_reason = kv_policy(s, calibration, default_depth)
    log.info("kv policy %s: %s", policy, policy_reason)
    engine_cfg = EngineConfig(
        scheduler=SchedulerConfig(
            s.max_batch, s.max_queue, s.prefill_chunk, max_context, s.speculative_max_batch
        ),
        kv_policy=policy,
        kv_cache_bytes=s.kv_cache_bytes or default_kv_bytes(device),
        block_size=s.block_size,
        eos_id=tokenizer.eos_id,
        compile=compile_mode(s.compile, device),
        typical_depth=default_depth,
        threads=threads,
        kv_cache_dtype=KV_CACHE_DTYPES.get(s.kv_cache_dtype),  # auto: None, the model's dtype
        coda_wait=s.coda_wait,
    )
    probe = load_exit_probe(model_dir, device, cfg.d_rec)
    frontier = Frontier.from_calibration(calibration, probe is not None)
    models = ServedModels(served_names(s), default_depth, s.max_depth, cfg.mean_recurrence,
                          parse_presets(s.preset))  # fmt: skip
    # before compiling: a preset every request would be refused is a start-up error
    models.check_presets(can_auto=frontier is not None, can_learn=probe is not None,
                         kv_policy=policy)  # fmt: skip
    engine = Engine(model, engine_cfg, state.metrics, probe)
    depths = [int(d) for d in s.compile_depths.split(",")] if s.compile_depths else [default_depth]
    started = time.monotonic()
    speculation = Speculation.parse(s.speculative)
    engine.compile_decode([d for d in depths if d <= s.max_depth], speculation)
    if engine_cfg.compile != "off":
        log.info("compiled decode (%s) for depths %s in %.0f s", engine_cfg.compile, depths,
                 time.monotonic() - started)  # fmt: skip
    engine.start()
    warm = EngineRequest([tokenizer.bos_id or 0, 1], SamplingParams(max_tokens=2), LoopParams(2))
    engine.generate_sync(warm)
    limits = ServingLimits(
        models=models,
        max_depth=s.max_depth,
        max_context=max_context,
        vocab_size=cfg.vocab_size,
        max_sequences=s.max_batch + s.max_queue,
        max_prompt_chars=max_context * longest_token_chars(tokenizer),
        frontier=frontier,
        speculative=speculation,
    )
    # published in /v1/models beside kv_policy: why it is in force (and up to which depth)
    card: dict = {"kv_policy_reason": policy_reason,
                  "kv_cache_dtype": str(engine.cache.outer_k.dtype).removeprefix("torch.")}  # fmt: skip
    if policy.upto:
        card["kv_policy_max_depth"] = policy.upto
    card.update(depth_table(model_dir, calibration) or {})
    if limits.frontier is not None:  # what criterion "auto" chooses from
        card["frontier"] = [p.public() for p in limits.frontier.points]
    state.model_card = {"dir": str(model_dir), "depth_table": card}
    state.engine, state.tokenizer = engine, tokenizer
    state.service = CompletionService(engine, tokenizer, limits)
    state.chat = ChatService(state.service, template)
    state.ready = True
    log.info("serving %s on %s (%s, KV cache %s), kv policy %s", limits.model_name, device,
             dtype, engine.cache.outer_k.dtype, policy)  # fmt: skip


async def in_own_thread(fn: Callable[..., object], *args: object) -> object:
    """Await `fn(*args)` run in a new thread that ends with it (unlike `asyncio.to_thread`'s
    pooled threads). Why: OpenMP keeps a worker pool for every thread that ran parallel
    kernels; while the loading thread's pool lived on beside the engine thread's, libgomp
    counted more threads than cores and stopped spinning between kernels, and decode on a
    bandwidth-bound model ran 1.7x slower (measured, bench/RESULTS.md)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(set_outcome: Callable[[object], None], value: object) -> None:
        if not done.done():  # the awaiting task may have been cancelled (shutdown)
            set_outcome(value)

    def run() -> None:
        try:
            outcome = (done.set_result, fn(*args))
        except BaseException as err:  # re-raised in the awaiting task
            outcome = (done.set_exception, err)
        with contextlib.suppress(RuntimeError):  # the loop closed first (shutdown)
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="parcae-load", daemon=True).start()
    return await done


def create_app(settings: ServerSettings) -> FastAPI:
    state = ServerState(settings, Metrics(served_names(settings)[0]))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                await in_own_thread(build, state)
            except Exception as err:  # keep serving /health (503) with the reason
                state.load_error = f"{type(err).__name__}: {err}"
                log.error("failed to load the model: %s", state.load_error)

        task = asyncio.create_task(load())
        yield
        task.cancel()
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="parcae-serve", version="0.1.0", lifespan=lifespan)
    app.state.parcae = state
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(InternalErrors)  # innermost: a crash answers as any response does
    app.add_middleware(RequestGate, api_keys=api_keys(settings),
                       max_body=settings.max_request_bytes)  # fmt: skip
    if settings.allowed_origins:  # outside the key check: a preflight carries no key
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])  # fmt: skip
    app.add_middleware(AccessLog)  # outermost: logs every request, refused ones too
    return app


def api_keys(settings: ServerSettings) -> list[str]:
    """--api-key values and the keys of --api-key-file (checked non-empty by the settings)."""
    return [
        *settings.api_key,
        *(read_key_file(settings.api_key_file) if settings.api_key_file else []),
    ]
