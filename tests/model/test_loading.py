"""Checkpoints in the released layout load into our model and reproduce logits."""

import json
from pathlib import Path

import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.loading import CheckpointError, load_checkpoint, save_checkpoint
from parcae_serve.model.parcae import Parcae
from tests.helpers import CONFIGS, random_model


def write_released(model: Parcae, directory: Path, prefix: str = "_orig_mod.") -> None:
    """The authors' layout: config.json (+ _class_name, rope_settings, training-only keys, no
    value_embed_layers) and an fp32 torch state dict with prefixed keys, tied head and freqs_cis."""
    cfg = model.cfg.to_dict()
    del cfg["value_embed_layers"]
    cfg.update({"init": {"strategy": "scaled-zero"}, "name": "parcae-test", "hf_config": {}})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    state[prefix + "freqs_cis"] = torch.zeros(4, 2)
    torch.save(state, directory / "pytorch_model.bin")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_released_layout_reproduces_logits(tmp_path: Path, name: str) -> None:
    model = random_model(CONFIGS[name])
    ids = torch.randint(0, model.cfg.vocab_size, (1, 12))
    before = model(ids, 5, torch.Generator().manual_seed(0))
    write_released(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.cfg.value_embed_layers == model.cfg.value_embed_layers
    assert loaded.lm_head.weight is loaded.transformer["wte"].weight
    assert torch.equal(loaded(ids, 5, torch.Generator().manual_seed(0)), before)


def test_save_writes_safetensors_that_round_trip(tmp_path: Path) -> None:
    model = random_model(CONFIGS["gqa-linear-gated-silu-wide-core"])
    save_checkpoint(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "ParcaeConfig"
    ids = torch.randint(0, model.cfg.vocab_size, (1, 6))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(load_checkpoint(tmp_path)(ids, 3, g()), model(ids, 3, g()))


def test_missing_weight_is_refused(tmp_path: Path) -> None:
    model = random_model(CONFIGS["mha-diagonal-relu2-ve"])
    write_released(model, tmp_path, prefix="module.")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del state["module.transformer.coda.0.mlp.fc.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"missing \['transformer.coda.0.mlp.fc.weight'\]"):
        load_checkpoint(tmp_path)


def test_unexpected_weight_is_refused(tmp_path: Path) -> None:
    model = random_model(CONFIGS["mha-diagonal-relu2-ve"])
    write_released(model, tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["transformer.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("injection_type", "gru"), ("norm_class_name", "LayerNorm"), ("nonlin_name", "Swish9")],
)
def test_unsupported_config_is_refused_naming_key_and_value(tmp_path: Path, key, value) -> None:
    write_released(random_model(CONFIGS["mha-diagonal-relu2-ve"]), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{key}={value!r}"):
        load_checkpoint(tmp_path)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(tmp_path)


def test_370m_config_has_the_released_tensor_and_parameter_counts() -> None:
    """parcae-370m: 117 tensors (state dict incl. tied head and freqs_cis), 388,003,328 params."""
    cfg = ParcaeConfig(
        block_size=2048, vocab_size=32768, n_embd=1024, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=4096, n_layers_in_prelude=4,
        n_layers_in_recurrent_block=4, n_layers_in_coda=4, mean_recurrence=8,
        value_embed_layers=[0, 1, 4, 7, 10, 11],
    )  # fmt: skip
    with torch.device("meta"):
        model = Parcae(cfg)
    assert sum(p.numel() for p in model.parameters()) == 388_003_328
    assert len(model.state_dict()) + 1 == 117  # + the reference's freqs_cis buffer
