"""The built-in checkpoint's tokenizer files are what Hugging Face tools expect: tokenizer.json
starts every encoding with BOS (as the server does) and tokenizer_config.json names the special
tokens and the context length."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.loading import builtin_checkpoint
from parcae_serve.model.tokenizer import Tokenizer


def test_tokenizer_config_names_the_special_tokens_and_the_context() -> None:
    directory = builtin_checkpoint()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_dir(directory)
    vocab = tok.tok.get_vocab()
    assert [vocab[config[k]] for k in ("bos_token", "eos_token", "pad_token")] == [0, 1, 2]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    cfg = json.loads((directory / "config.json").read_text())
    assert (
        config["model_max_length"]
        == ParcaeConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}).block_size
    )


def test_tokenizer_json_adds_bos_like_the_server() -> None:
    directory = builtin_checkpoint()
    raw = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    text = "def f(x):\n    return x\n"
    assert raw.encode(text).ids == Tokenizer.from_dir(directory).encode(text)


def test_transformers_loads_it_offline() -> None:
    transformers = pytest.importorskip("transformers")
    directory = builtin_checkpoint()
    hf = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    text = "import os\n"
    assert hf(text)["input_ids"] == Tokenizer.from_dir(directory).encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
