"""ParcaeConfig: the released checkpoints' config keys, with defaults that describe a tiny model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED = {
    "norm_class_name": {"RMSNorm"},
    "mlp_class_name": {"BaseMLP", "GatedMLP"},
    "nonlin_name": {"ReLU2", "GELU", "SiLU", "ReLU", "Tanh"},
    "injection_type": {"diagonal", "linear", "add"},
    "state_init": {"like-init", "zero", "normal", "embed", "unit"},
}
# Training-only or bookkeeping keys the released config.json may carry; inference ignores them.
IGNORED_KEYS = {"_class_name", "init", "hf_config", "name"}


def layer_location(j: int, n_prelude: int, n_recurrent: int) -> tuple[str, int]:
    """Effective layer index j -> (part, index in part): prelude, then core_block, then coda."""
    if j < n_prelude:
        return "prelude", j
    if j < n_prelude + n_recurrent:
        return "core_block", j - n_prelude
    return "coda", j - n_prelude - n_recurrent


class ConfigError(ValueError):
    """A config the server cannot serve; the message names the key and value."""


@dataclass
class RopeSettings:
    use_rope: bool = True
    rope_condense_ratio: int = 1
    rope_base: float = 50_000.0


@dataclass
class ParcaeConfig:
    block_size: int = 256
    vocab_size: int = 512
    padded_vocab_size: int | None = None
    padding_multiple: int = 64
    n_embd: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int | None = None
    bias: bool = False
    tie_embeddings: bool = True
    norm_class_name: str = "RMSNorm"
    norm_eps: float = 1e-5
    mlp_class_name: str = "BaseMLP"
    nonlin_name: str = "ReLU2"
    qk_norm: bool = True
    logit_softcap: float | None = None
    prelude_norm: bool = True
    injection_type: str = "diagonal"
    state_init: str = "like-init"
    recurrent_embedding_dimension: int | None = None
    recurrent_intermediation_embedding_dimension: int | None = None
    recurrent_num_attention_heads: int | None = None
    n_layers_in_prelude: int = 1
    n_layers_in_recurrent_block: int = 2
    n_layers_in_coda: int = 1
    mean_recurrence: int = 4
    mean_backprop_depth: int = 2
    init_strategy: str = "scaled-zero"
    clip_qkv: float | None = None
    qk_bias: bool = False
    rope_settings: RopeSettings = field(default_factory=RopeSettings)
    # Not a reference key: effective layer indices that carry a value embedding. The loader sets it
    # from the checkpoint's keys; `save` writes it so our own checkpoints round-trip.
    value_embed_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.rope_settings, dict):
            self.rope_settings = RopeSettings(**self.rope_settings)
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = math.ceil(self.vocab_size / m) * m
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        self.recurrent_embedding_dimension = self.recurrent_embedding_dimension or self.n_embd
        self.recurrent_intermediation_embedding_dimension = (
            self.recurrent_intermediation_embedding_dimension
            or self.intermediate_size * self.recurrent_embedding_dimension // self.n_embd
        )
        self.recurrent_num_attention_heads = (
            self.recurrent_num_attention_heads or self.num_attention_heads
        )
        self.validate()

    # Derived quantities -------------------------------------------------------------------
    @property
    def d_rec(self) -> int:
        return self.recurrent_embedding_dimension  # type: ignore[return-value]

    @property
    def recurrent_kv_heads(self) -> int:
        group = self.num_attention_heads // self.num_key_value_heads  # type: ignore[operator]
        return max(1, self.recurrent_num_attention_heads // group)  # type: ignore[operator]

    @property
    def n_layers_total(self) -> int:
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def embedding_scale(self) -> float:
        # `scaled-zero` (the only strategy the released models use) sets both scales to 1.
        return 1.0

    @property
    def logit_scale(self) -> float:
        return 1.0

    def validate(self) -> None:
        for key, allowed in SUPPORTED.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"unsupported {key}={value!r}; supported: {sorted(allowed)}")
        if self.init_strategy != "scaled-zero":
            raise ConfigError(
                f"unsupported init_strategy={self.init_strategy!r}; supported: ['scaled-zero']"
            )
        if self.qk_bias:
            raise ConfigError("unsupported qk_bias=True; supported: [False]")
        if self.bias:
            raise ConfigError("unsupported bias=True; supported: [False]")
        if not self.rope_settings.use_rope:
            raise ConfigError("unsupported rope_settings.use_rope=False; supported: [True]")
        checks = [
            ("n_embd", self.n_embd, self.num_attention_heads),
            ("recurrent_embedding_dimension", self.d_rec, self.recurrent_num_attention_heads),
            ("num_attention_heads", self.num_attention_heads, self.num_key_value_heads),
        ]
        for key, value, divisor in checks:
            if value % divisor:
                raise ConfigError(f"{key}={value} is not divisible by {divisor}")
        if self.injection_type == "add" and self.d_rec != self.n_embd:
            raise ConfigError("injection_type='add' needs recurrent_embedding_dimension == n_embd")
        for key in ("n_layers_in_prelude", "n_layers_in_coda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")
        if self.n_layers_in_recurrent_block < 1:
            raise ConfigError(f"n_layers_in_recurrent_block={self.n_layers_in_recurrent_block} < 1")

    # Serialisation --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ParcaeConfig:
        """Build from a released config.json; training-only keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["_class_name"] = "ParcaeConfig"
        return out
