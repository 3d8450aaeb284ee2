"""Checkpoint directories in the released layout: config.json + weights + tokenizer.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from parcae_serve.model.config import ConfigError, ParcaeConfig, layer_location
from parcae_serve.model.parcae import Parcae

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt")
PREFIXES = ("module.", "_orig_mod.", "model.")
IGNORED_WEIGHTS = re.compile(r"(^|\.)freqs_cis$")
VE_KEY = re.compile(r"^value_embeds\.(\d+)\.weight$")
BUILTIN_DIR = Path(__file__).parent / "builtin"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; the message says what is wrong."""


def builtin_checkpoint() -> Path:
    """The model shipped inside the package (the only sub-directory of model/builtin/)."""
    dirs = sorted(p for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists())
    if not dirs:
        raise CheckpointError(
            f"no built-in model under {BUILTIN_DIR}; run `python -m parcae_serve.model.train`"
        )
    return dirs[0]


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if path.exists():
            raw = (
                load_file(str(path))
                if name.endswith(".safetensors")
                else torch.load(path, map_location="cpu", weights_only=True)
            )
            if "state_dict" in raw and isinstance(raw["state_dict"], dict):
                raw = raw["state_dict"]
            return {_strip(k): v for k, v in raw.items() if not IGNORED_WEIGHTS.search(k)}
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"no config.json in {directory}")
    return json.loads(path.read_text())


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Parcae:
    """Load a released-layout checkpoint; refuse unsupported configs and missing/extra weights."""
    directory = Path(directory)
    raw_config = read_config(directory)
    state = read_state_dict(directory)
    ve_layers = sorted(int(m.group(1)) for k in state if (m := VE_KEY.match(k)))
    # A layer applies a value embedding only when both the table and its gate exist.
    raw_config["value_embed_layers"] = [j for j in ve_layers if _has_gate(state, raw_config, j)]
    try:
        cfg = ParcaeConfig.from_dict(raw_config)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{directory / 'config.json'}: {err}") from err
    for j in set(ve_layers) - set(cfg.value_embed_layers):
        del state[f"value_embeds.{j}.weight"]  # a table with no gate is never read
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    with torch.device("meta"):  # no throw-away random init: every tensor comes from `state`
        model = Parcae(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"weights in {directory} do not match its config: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer["wte"].weight
    return model.to(device=device, dtype=dtype).eval()


def _has_gate(state: dict, raw_config: dict, j: int) -> bool:
    defaults = ParcaeConfig()
    P = raw_config.get("n_layers_in_prelude", defaults.n_layers_in_prelude)
    R = raw_config.get("n_layers_in_recurrent_block", defaults.n_layers_in_recurrent_block)
    part, i = layer_location(j, P, R)
    return f"transformer.{part}.{i}.attn.ve_gate.weight" in state


def save_checkpoint(model: Parcae, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors (tied head stored once, as the reference does)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
