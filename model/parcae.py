"""The Parcae looped transformer: prelude -> recurrent block looped T times -> coda.

Reads like `shared/design/parcae-model.md`. Attention goes through an `AttentionContext`, so the
same modules serve the plain full-sequence forward (training, tests) and the server's KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parcae_serve.model.config import ParcaeConfig, layer_location

VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the normed input

T = TypeVar("T")


class AttentionContext(Protocol):
    """Where attention reads and writes K/V. `key` names the cache: ("prelude", i),
    ("core", i, loop) or ("coda", i). q: (B, H, Lq, hd); k, v: (B, Hkv, Lq, hd)."""

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


def sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """Scaled dot-product attention with grouped K/V heads (fused kernels where available)."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class CausalContext:
    """No cache: each call sees the whole sequence at once (training, reference, scoring)."""

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sdpa(q, k, v, causal=q.shape[2] > 1)


def frozen(module: nn.Module, name: str, params: tuple[Tensor, ...], build: Callable[[], T]) -> T:
    """`build()` cached on `module` until one of `params` changes (in place or replaced): lets
    inference reuse derived weights (a tensor or a tuple of them) without a separate 'compile'
    step.

    Inside a compiled graph a value already built eagerly is read as a graph input, and is not
    checked against `params` again: a graph serves weights that do not change after it was
    warmed up (an eager call first builds them; see CompiledDecoder.warm). Building it inside
    the graph would redo it on every call (inductor's freezing does not fold derived weights of
    a model passed as an argument: measured, the fused QKV weight was re-concatenated on every
    decode token)."""
    built = module.__dict__.setdefault("_frozen", {})
    if torch.compiler.is_compiling():
        return built[name][1] if name in built else build()
    stamp = tuple((p.data_ptr(), p._version) for p in params)
    if name not in built or built[name][0] != stamp:
        built[name] = (stamp, build())
    return built[name][1]


def derived_weights(model: nn.Module) -> list[Tensor]:
    """Every tensor `frozen` has built and cached in `model`'s modules (for a CUDA graph to
    read them in place instead of copying them in at every replay)."""

    def leaves(value: object) -> list[Tensor]:
        if isinstance(value, Tensor):
            return [value]
        return [t for v in value for t in leaves(v)] if isinstance(value, tuple) else []

    return [t for m in model.modules() for _, v in m.__dict__.get("_frozen", {}).values()
            for t in leaves(v)]  # fmt: skip


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """RMSNorm computed in fp32, cast back, then scaled (the reference's order; in fp32 that is
    one fused kernel)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return y if weight is None else y * weight


class Embedding(nn.Embedding):
    """`nn.Embedding` whose random init is skipped on the meta device (checkpoint loading):
    torch's `normal_` there runs a reference kernel whose first call imports dynamo, ~2 s of
    every server's start."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.eps, self.weight)


def rope_table(head_dim: int, length: int, base: float, condense: int) -> Tensor:
    """Rotations (length, head_dim/2, 2) as (cos, sin): pair m turns by pos / base^(2m/head_dim).
    Real, not complex, so compiled graphs fuse them (inductor has no complex kernels)."""
    cpu = torch.device("cpu")  # explicit, so a model built on the meta device still gets tables
    inv_freq = 1.0 / base ** (
        torch.arange(0, head_dim, 2, dtype=torch.float64, device=cpu) / head_dim
    )
    pos = torch.arange(length, dtype=torch.float64, device=cpu) / condense
    angles = torch.outer(pos, inv_freq)
    return torch.stack([angles.cos(), angles.sin()], -1).float()


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate interleaved pairs (2m, 2m+1) in fp32; rot (.., hd/2, 2) broadcasts over
    (B, H, L, hd/2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    xe, xo, cos, sin = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
    return torch.stack([xe * cos - xo * sin, xe * sin + xo * cos], -1).flatten(-2)


NONLINEARITIES = {
    "ReLU2": lambda x: 0.5 * F.relu(x).square(),
    "GELU": F.gelu,
    "SiLU": F.silu,
    "ReLU": F.relu,
    "Tanh": torch.tanh,
}


class MLP(nn.Module):
    """BaseMLP: proj(act(fc(x))). GatedMLP: fc yields (a, b); proj(act(a) * b)."""

    def __init__(self, width: int, hidden: int, cfg: ParcaeConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp_class_name == "GatedMLP"
        self.act = NONLINEARITIES[cfg.nonlin_name]
        self.fc = nn.Linear(width, hidden * (2 if self.gated else 1), bias=False)
        self.proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            return self.proj(self.act(a) * b)
        return self.proj(self.act(h))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, cfg: ParcaeConfig, ve: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, width // heads
        self.c_q = nn.Linear(width, heads * self.head_dim, bias=False)
        self.c_k = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(width, kv_heads * self.head_dim, bias=False)
        self.c_proj = nn.Linear(heads * self.head_dim, width, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, kv_heads, bias=False) if ve else None
        self.qk_norm, self.clip, self.eps = cfg.qk_norm, cfg.clip_qkv, cfg.norm_eps

    def forward(
        self, x: Tensor, rot: Tensor, ve: Tensor | None, ctx: AttentionContext, key: tuple
    ) -> Tensor:
        B, L, _ = x.shape
        H, Hkv, hd = self.heads, self.kv_heads, self.head_dim
        if torch.is_grad_enabled():
            qkv = torch.cat([self.c_q(x), self.c_k(x), self.c_v(x)], -1)
        else:
            ws = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
            qkv = F.linear(x, frozen(self, "_qkv", ws, lambda: torch.cat(ws)))
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        qkv = qkv.view(B, L, H + 2 * Hkv, hd).transpose(1, 2)
        qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv :]
        if ve is not None and self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, L, Hkv)
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, L, Hkv, hd).transpose(1, 2)
        qk = apply_rope(qk, rot)  # q and k heads together: one rotation, one norm
        if self.qk_norm:
            qk = rms_norm(qk, self.eps)
        qk = qk.to(x.dtype)
        y = ctx.attend(key, qk[:, :H], qk[:, H:], v)
        return self.c_proj(y.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(
        self, width: int, hidden: int, heads: int, kv_heads: int, cfg: ParcaeConfig, ve: bool
    ) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(width, cfg.norm_eps)
        self.attn = Attention(width, heads, kv_heads, cfg, ve)
        self.norm_2 = RMSNorm(width, cfg.norm_eps)
        self.mlp = MLP(width, hidden, cfg)

    def forward(
        self, x: Tensor, rot: Tensor, ve: Tensor | None, ctx: AttentionContext, key: tuple
    ) -> Tensor:
        x = x + self.attn(self.norm_1(x), rot, ve, ctx, key)
        return x + self.mlp(self.norm_2(x))


class DiagonalInjection(nn.Module):
    """u = h * exp(-dt * exp(A_log)) + dt * (e @ B.T), dt = softplus(dt_bias): rho(A_bar) < 1."""

    def __init__(self, d: int, d_rec: int) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(d_rec))
        self.dt_bias = nn.Parameter(torch.zeros(d_rec))
        self.B = nn.Parameter(torch.zeros(d_rec, d))

    def decay(self) -> Tensor:
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def prepare(self, e: Tensor) -> Tensor:
        """The loop-invariant term B_bar e, computed once per token rather than once per loop."""
        return F.softplus(self.dt_bias) * (e @ self.B.T)

    def forward(self, h: Tensor, prepared: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return h * self.decay() + prepared
        return torch.addcmul(
            prepared, h, frozen(self, "_decay", (self.A_log, self.dt_bias), self.decay)
        )


class LinearInjection(nn.Module):
    """u = W [h; e]; split as W_h h + W_e e so the e half is computed once per token."""

    def __init__(self, d: int, d_rec: int) -> None:
        super().__init__()
        self.d_rec = d_rec
        self.adapter = nn.Linear(d_rec + d, d_rec, bias=False)

    def prepare(self, e: Tensor) -> Tensor:
        return e @ self.adapter.weight[:, self.d_rec :].T

    def forward(self, h: Tensor, prepared: Tensor) -> Tensor:
        return h @ self.adapter.weight[:, : self.d_rec].T + prepared


class AddInjection(nn.Module):
    def prepare(self, e: Tensor) -> Tensor:
        return e

    def forward(self, h: Tensor, prepared: Tensor) -> Tensor:
        return h + prepared


def make_injection(cfg: ParcaeConfig) -> nn.Module:
    if cfg.injection_type == "diagonal":
        return DiagonalInjection(cfg.n_embd, cfg.d_rec)
    if cfg.injection_type == "linear":
        return LinearInjection(cfg.n_embd, cfg.d_rec)
    return AddInjection()


def truncated_normal(t: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """`t` filled from N(0, std^2) truncated to +-3 std: draw every element, redraw the whole
    tensor where any fell outside and keep those redraws, until none does (what
    `nn.init.trunc_normal_` does for bounds this wide, in a third of its ops: the engine draws
    one row per decoded token, and each op outside the decode graph costs ~10 us there)."""
    bound = 3 * std
    t.normal_(0.0, std, generator=generator)
    while bool((outside := t.abs() > bound).any()):
        t = torch.where(outside, torch.empty_like(t).normal_(0.0, std, generator=generator), t)
    return t


class Parcae(nn.Module):
    def __init__(self, cfg: ParcaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        P, R = cfg.n_layers_in_prelude, cfg.n_layers_in_recurrent_block
        ve = set(cfg.value_embed_layers)
        d, d_rec, H, Hkv = cfg.n_embd, cfg.d_rec, cfg.num_attention_heads, cfg.num_key_value_heads
        hidden, hidden_rec = cfg.intermediate_size, cfg.recurrent_intermediation_embedding_dimension
        H_rec, Hkv_rec = cfg.recurrent_num_attention_heads, cfg.recurrent_kv_heads

        def blocks(n: int, offset: int, *shape: int) -> nn.ModuleList:
            return nn.ModuleList(Block(*shape, cfg=cfg, ve=offset + i in ve) for i in range(n))

        self.transformer = nn.ModuleDict(
            {
                "wte": Embedding(cfg.padded_vocab_size, d),
                "prelude": blocks(P, 0, d, hidden, H, Hkv),
                "adapter": make_injection(cfg),
                "core_block": blocks(R, P, d_rec, hidden_rec, H_rec, Hkv_rec),
                "C": nn.Linear(d_rec, d, bias=False),
                "coda": blocks(cfg.n_layers_in_coda, P + R, d, hidden, H, Hkv),
                "ln_f": RMSNorm(d, cfg.norm_eps),
            }
        )
        if cfg.prelude_norm:
            self.transformer["ln_prelude"] = RMSNorm(d, cfg.norm_eps)
        widths = {j: self._block(j).attn.kv_heads * self._block(j).attn.head_dim for j in ve}
        self.value_embeds = nn.ModuleDict(
            {str(j): Embedding(cfg.padded_vocab_size, w) for j, w in sorted(widths.items())}
        )
        self.lm_head = nn.Linear(d, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer["wte"].weight
        # Rotation tables live outside the state dict and outside `.to(dtype)`: they stay
        # fp32 (cos, sin) whatever the weights' dtype, and follow the device on first use.
        base, condense = cfg.rope_settings.rope_base, cfg.rope_settings.rope_condense_ratio
        self._rope = {
            hd: rope_table(hd, cfg.block_size, base, condense) for hd in {d // H, d_rec // H_rec}
        }

    def rope_tables(self) -> list[Tensor]:
        """The rotation tables, (block_size, head_dim // 2, 2) (cos, sin) per head size."""
        return list(self._rope.values())

    # Layer bookkeeping ------------------------------------------------------------------------
    def _block(self, j: int) -> Block:
        part, i = layer_location(
            j, self.cfg.n_layers_in_prelude, self.cfg.n_layers_in_recurrent_block
        )
        return self.transformer[part][i]

    def rotations(self, positions: Tensor) -> dict[int, Tensor]:
        """Per head_dim, rotations (B, 1, L, hd/2, 2) for positions (B, L); reused every loop."""
        out = {}
        for hd, table in self._rope.items():
            if table.device != positions.device:
                table = self._rope[hd] = table.to(positions.device)
            out[hd] = table[positions].unsqueeze(1)
        return out

    def _run(
        self, part: str, offset: int, x: Tensor, ids: Tensor, rots: dict, ctx, loop: int | None
    ) -> Tensor:
        for i, block in enumerate(self.transformer[part]):
            name = str(offset + i)
            ve = self.value_embeds[name](ids) if name in self.value_embeds else None
            key = (part, i) if loop is None else (part, i, loop)
            x = block(x, rots[block.attn.head_dim], ve, ctx, key)
        return x

    # The three parts ---------------------------------------------------------------------------
    def prelude(self, ids: Tensor, rots: dict, ctx: AttentionContext) -> Tensor:
        """Token ids (B, L) -> latent e (B, L, d)."""
        x = self.transformer["wte"](ids) * self.cfg.embedding_scale
        x = self._run("prelude", 0, x, ids, rots, ctx, None)
        return self.transformer["ln_prelude"](x) if self.cfg.prelude_norm else x

    def initial_state(
        self, batch: int, length: int, generators: list[torch.Generator | None], like: Tensor
    ) -> Tensor:
        """Random (or zero) h_0 per row, drawn on the CPU from each row's own generator so a
        seeded request is reproducible whatever shares its batch and whatever the device."""
        d, kind = self.cfg.d_rec, self.cfg.state_init
        if kind == "zero":
            return like.new_zeros(batch, length, d)
        rows = []
        for g in generators:
            t = torch.empty(length, d)
            if kind == "like-init":
                t = truncated_normal(t, self._like_init_std, g) * self.cfg.embedding_scale
            else:
                t.normal_(generator=g)
                if kind == "embed":
                    t /= math.sqrt(d)
                elif kind == "unit":
                    t = (t - t.mean(-1, keepdim=True)) / t.std(-1, keepdim=True)
            rows.append(t)
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    @property
    def _like_init_std(self) -> float:
        """The std of a "like-init" h_0 before the embedding scale (as the weights' init)."""
        return math.sqrt(2 / (5 * self.cfg.d_rec))

    def seeded_states(self, seeds: list[int], generator: torch.Generator, like: Tensor) -> Tensor:
        """h_0 rows (N, d_rec), row i what `initial_state(1, 1, [generator], like)` draws right
        after `generator.manual_seed(seeds[i])`; in a few ops per row, where the engine would
        otherwise pay ~10 for every decoded token."""
        if self.cfg.state_init != "like-init":
            rows = []
            for seed in seeds:
                generator.manual_seed(seed)
                rows.append(self.initial_state(1, 1, [generator], like)[0])
            return torch.cat(rows)
        std = self._like_init_std
        t = torch.empty(len(seeds), self.cfg.d_rec)
        for row, seed in zip(t, seeds, strict=True):
            generator.manual_seed(seed)
            row.normal_(0.0, std, generator=generator)
        for i in (t.abs() > 3 * std).any(1).nonzero()[:, 0].tolist():  # redrawn as one row is
            generator.manual_seed(seeds[i])
            t[i] = truncated_normal(t[i].clone(), std, generator)
        return (t * self.cfg.embedding_scale).to(device=like.device, dtype=like.dtype)

    def core(
        self, h: Tensor, prepared: Tensor, ids: Tensor, rots: dict, ctx: AttentionContext, loop: int
    ) -> Tensor:
        """One loop: h_{t+1} = R(inject(h_t, e))."""
        u = self.transformer["adapter"](h, prepared)
        return self._run("core_block", self.cfg.n_layers_in_prelude, u, ids, rots, ctx, loop)

    def coda(self, h: Tensor, ids: Tensor, rots: dict, ctx: AttentionContext) -> Tensor:
        """Final state (B, L, d_rec) -> logits over the real vocabulary, fp32."""
        y = self.transformer["C"](h)
        offset = self.cfg.n_layers_in_prelude + self.cfg.n_layers_in_recurrent_block
        y = self.transformer["ln_f"](self._run("coda", offset, y, ids, rots, ctx, None))
        return self.head(y)

    def head(self, y: Tensor) -> Tensor:
        logits = self.lm_head(y).float()[..., : self.cfg.vocab_size] * self.cfg.logit_scale
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def forward(
        self,
        ids: Tensor,
        depth: int,
        generator: torch.Generator | None = None,
        backprop_depth: int | None = None,
    ) -> Tensor:
        """Whole-sequence forward at recurrence depth T = `depth`; logits (B, L, vocab).
        With `backprop_depth`, only the last that many loops are differentiated (training)."""
        B, L = ids.shape
        positions = torch.arange(L, device=ids.device).expand(B, L)
        rots, ctx = self.rotations(positions), CausalContext()
        e = self.prelude(ids, rots, ctx)
        prepared = self.transformer["adapter"].prepare(e)
        h = self.initial_state(B, L, [generator] * B, e)
        no_grad_loops = depth - backprop_depth if backprop_depth else 0
        for t in range(depth):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= no_grad_loops):
                h = self.core(h, prepared, ids, rots, ctx, t)
        return self.coda(h, ids, rots, ctx)
