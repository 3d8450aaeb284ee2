import queue
import re
import time
from collections.abc import Callable

import httpx
import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.parcae import Parcae


def random_model(cfg: ParcaeConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Parcae:
    """A tiny model whose every parameter is random (no zero or identity shortcuts)."""
    torch.manual_seed(seed)
    model = Parcae(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("A_log", "dt_bias")):
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def reference_cfg(cfg: ParcaeConfig) -> dict:
    """The few facts the plain reference needs, spelled out from the config."""
    return {
        "P": cfg.n_layers_in_prelude,
        "R": cfg.n_layers_in_recurrent_block,
        "C": cfg.n_layers_in_coda,
        "norm_eps": cfg.norm_eps,
        "rope_base": cfg.rope_settings.rope_base,
        "nonlin_name": cfg.nonlin_name,
        "mlp_class_name": cfg.mlp_class_name,
        "injection_type": cfg.injection_type,
        "logit_softcap": cfg.logit_softcap,
        "vocab_size": cfg.vocab_size,
        "heads": {
            "prelude": cfg.num_attention_heads,
            "coda": cfg.num_attention_heads,
            "core_block": cfg.recurrent_num_attention_heads,
        },
        "kv_heads": {
            "prelude": cfg.num_key_value_heads,
            "coda": cfg.num_key_value_heads,
            "core_block": cfg.recurrent_kv_heads,
        },
    }


CONFIGS = {
    "mha-diagonal-relu2-ve": ParcaeConfig(
        n_embd=64, num_attention_heads=4, vocab_size=100, value_embed_layers=[0, 2, 3]
    ),
    "gqa-linear-gated-silu-wide-core": ParcaeConfig(
        n_embd=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        recurrent_embedding_dimension=96,
        injection_type="linear",
        mlp_class_name="GatedMLP",
        nonlin_name="SiLU",
        logit_softcap=30.0,
        vocab_size=90,
        n_layers_in_prelude=2,
        n_layers_in_coda=2,
        value_embed_layers=[1, 2, 3, 5],
        state_init="normal",
    ),
    "add-gelu-deep-prelude": ParcaeConfig(
        n_embd=32,
        num_attention_heads=2,
        injection_type="add",
        nonlin_name="GELU",
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=1,
        vocab_size=70,
        state_init="embed",
    ),
}


def tiny_checkpoint(directory, cfg: ParcaeConfig | None = None, seed: int = 0):
    """A released-layout directory: random tiny model + a BPE trained on a few stdlib files."""
    from pathlib import Path

    from parcae_serve.model.loading import save_checkpoint
    from parcae_serve.model.train import read_texts, stdlib_files, train_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = read_texts(stdlib_files()[:40])
    tok = train_tokenizer(texts, 384)
    tok.save(str(directory / "tokenizer.json"))
    cfg = cfg or ParcaeConfig(
        n_embd=64, num_attention_heads=4, vocab_size=tok.get_vocab_size(),
        value_embed_layers=[0, 2, 3], mean_recurrence=3, block_size=512,
    )  # fmt: skip
    save_checkpoint(random_model(cfg, seed), directory)
    return directory


# A test that bounds wall-clock time (a stall of the event loop, an exit "at once") shares 2
# cores with another test worker and real servers: one rerun, reported as such ("1 rerun" in
# pytest's summary), before its failure counts. The bounds stay far below the faults guarded.
wall_clock = pytest.mark.flaky(reruns=1)


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def outputs_together(engine, requests: list, timeout: float = 120) -> list[list]:
    """Submit every request to a running engine at once (so they share steps), then collect
    each one's StepOutputs up to its finish."""
    queues = [queue.SimpleQueue() for _ in requests]
    for request, q in zip(requests, queues, strict=True):
        engine.submit(request, q.put)
    results = []
    for q in queues:
        outs = [q.get(timeout=timeout)]
        while outs[-1].finish_reason is None:
            outs.append(q.get(timeout=timeout))
        results.append(outs)
    return results


def prefix_hit_tokens(cache, before: int) -> int:
    """Prompt tokens the prefix cache served since its hit counter read `before` (counted in
    tokens, as vLLM does): always whole blocks."""
    gained = cache.prefix_hits - before
    assert gained % cache.block_size == 0, gained
    return gained


def metric(url: str, name: str, reason: str | None = None) -> float:
    """A series' value (0 if it does not exist yet): `name` with any model_name label, and
    finished_reason=`reason` if given."""
    text = httpx.get(f"{url}/metrics").text
    labels = rf'\{{(finished_reason="{reason}",)?model_name="[^"]*"\}}'
    match = re.search(rf"^{re.escape(name)}{labels} (\S+)$", text, re.M)
    if reason is not None and (match is None or "finished_reason" not in match[0]):
        return 0.0
    assert match, name
    return float(match.group(2))
