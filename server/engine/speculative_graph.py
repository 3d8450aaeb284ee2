"""The compiled graphs of self-speculative decoding: k greedy drafts in one call, and the
verify pass of k drafted tokens per sequence at the full depth in one call.

Draft: for a row whose sampling is plain greedy, the k draft tokens are produced one after
another inside one graph (each step: prelude, d loops, coda, argmax, the next step reads this
step's K/V from the call), so a round pays one call's overhead for its k drafts instead of k.

Verify: a draft at depth d ran loops 0..d-1 of every drafted position exactly as the full-depth
decode would have (loop t of a position reads only loops <= t of the positions before it, and
those were drafted the same way), so the verify pass does not redo them: it starts from the
drafted states h_d, runs loops d..T-1 and the coda over the k positions as one causal chunk, and
returns the logits that confirm or reject each draft. The prelude runs again (one layer on k
rows: cheaper than keeping the latent of every draft) and rewrites the same K/V.

Like the decode graph, both only read the pools (past positions through per-row pool indices,
the call's own K/V from the call) and return the new K/V for `write_kv`, flattened over the
B*k tokens (row-major).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parcae_serve.model.parcae import Parcae, sdpa
from parcae_serve.server.engine.decode_graph import (
    SINGLE_ROW_OPTIONS,
    DecodeBatch,
    DecodeResult,
    PoolReadAttention,
    compile_options,
    dummy_batch,
    pad_batch,
    padded_slots,
    pools_of,
    stacked_kv,
)
from parcae_serve.server.engine.kv_cache import KVCache


def _flat_tokens(kv: Tensor) -> Tensor:
    """(B, Hkv, K, hd) -> (B*K, Hkv, hd)."""
    return kv.transpose(1, 2).flatten(0, 1)


class DraftReadAttention(PoolReadAttention):
    """AttentionContext for draft steps of one token per row: past K/V read in place from the
    pools, the earlier steps' K/V of this call and the token's own; all recorded per key."""

    def __init__(
        self, pools: tuple[Tensor, Tensor, Tensor, Tensor], batch: DecodeBatch, n_prelude: int
    ) -> None:
        super().__init__(pools, batch, n_prelude)
        self.steps: dict[tuple, list[tuple[Tensor, Tensor]]] = {}
        self.past = ~self.invalid[:, None, None, :, 0, 0]  # (B, 1, 1, L)

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool_k, pool_v, rows = self._past(key)
        steps = self.steps.setdefault(key, [])
        steps.append(self._as_stored(k, v))
        keys = torch.cat([pool_k[rows].transpose(1, 2)] + [s[0] for s in steps], 2).float()
        values = torch.cat([pool_v[rows].transpose(1, 2)] + [s[1] for s in steps], 2).float()
        B = q.shape[0]
        local = torch.ones(B, 1, 1, len(steps), dtype=torch.bool, device=q.device)
        mask = torch.cat([self.past, local], -1)
        return sdpa(q.float(), keys, values, mask=mask).to(q.dtype)

    def new_kv(self, key: tuple) -> tuple[Tensor, Tensor]:
        """Every step's K and V of `key`, (B*k, Hkv, hd) each."""
        steps = self.steps[key]
        k = torch.cat([s[0] for s in steps], 2)
        v = torch.cat([s[1] for s in steps], 2)
        return _flat_tokens(k), _flat_tokens(v)


@dataclass
class DraftResult:
    """tokens: (B, k) long, the drafts; h: (B*k, d_rec) states after the draft loops; K/V as in
    DecodeResult, flattened over the B*k tokens."""

    tokens: Tensor
    h: Tensor
    outer_k: Tensor
    outer_v: Tensor
    rec_k: Tensor
    rec_v: Tensor


def draft_forward(
    model: Parcae, depth: int, batch: DecodeBatch, pools: tuple[Tensor, Tensor, Tensor, Tensor]
) -> DraftResult:
    """k greedy draft tokens per row at `depth` loops (k = batch.positions.shape[1], static).

    batch: ids (B, 1) each row's last accepted token; positions (B, k) the k positions it
    drafts from; h0 (B, k, d_rec) their initial states; lengths (B,) = positions[:, 0]; rows
    and slots as in decode. Each draft is its position's argmax and the next position's input;
    K/V are those of loops 0..depth-1 and the outer layers."""
    ctx = DraftReadAttention(pools, batch, model.cfg.n_layers_in_prelude)
    ids, drafts, states = batch.ids, [], []
    for j in range(batch.positions.shape[1]):
        rots = model.rotations(batch.positions[:, j : j + 1])
        prepared = model.transformer["adapter"].prepare(model.prelude(ids, rots, ctx))
        h = batch.h0[:, j : j + 1]
        for t in range(depth):
            h = model.core(h, prepared, ids, rots, ctx, t)
        ids = model.coda(h, ids, rots, ctx)[:, 0].argmax(-1, keepdim=True)
        drafts.append(ids)
        states.append(h)
    kv = stacked_kv(model, list(ctx.steps), ctx.new_kv, range(depth))
    return DraftResult(torch.cat(drafts, 1), torch.cat(states, 1).flatten(0, 1), *kv)


def draft_forward_single(
    model: Parcae, depth: int, batch: DecodeBatch, pools: tuple[Tensor, Tensor, Tensor, Tensor]
) -> DraftResult:
    """`draft_forward` for one row, compiled apart with SINGLE_ROW_OPTIONS (see
    decode_forward_single)."""
    return draft_forward(model, depth, batch, pools)


class ChunkReadAttention(PoolReadAttention):
    """AttentionContext for rows of k new tokens each: past K/V read in place from the pools
    (masked past each row's length), the chunk's own K/V causally; new K/V recorded."""

    def __init__(
        self, pools: tuple[Tensor, Tensor, Tensor, Tensor], batch: DecodeBatch, n_prelude: int
    ) -> None:
        super().__init__(pools, batch, n_prelude)
        B, K = batch.ids.shape
        past = ~self.invalid[:, :, 0, 0]  # (B, L)
        causal = torch.ones(K, K, dtype=torch.bool, device=past.device).tril()
        mask = torch.cat([past[:, None, :].expand(B, K, -1), causal.expand(B, K, K)], -1)
        self.mask = mask[:, None]  # (B, 1, K, L + K)

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool_k, pool_v, rows = self._past(key)
        k, v = self._as_stored(k, v)
        self.new[key] = (k, v)
        keys = torch.cat([pool_k[rows].transpose(1, 2).float(), k.float()], 2)
        values = torch.cat([pool_v[rows].transpose(1, 2).float(), v.float()], 2)
        return sdpa(q.float(), keys, values, mask=self.mask).to(q.dtype)


def verify_forward(
    model: Parcae,
    depth: int,
    start: int,
    batch: DecodeBatch,
    pools: tuple[Tensor, Tensor, Tensor, Tensor],
) -> DecodeResult:
    """Loops `start`..`depth`-1 and the coda for B rows of K drafted tokens each.

    batch: ids, positions (B, K); h0 (B, K, d_rec) the drafted states after `start` loops;
    lengths (B,) the first position of each row's chunk; rows and slots as in decode.
    Returns logits (B*K, V) fp32, h (B*K, d_rec) and the new K/V flattened over B*K tokens:
    outer (P+C, B*K, Hkv, hd), recurrent (depth-start, R, B*K, Hkv_rec, hd_rec)."""
    ctx = ChunkReadAttention(pools, batch, model.cfg.n_layers_in_prelude)
    rots = model.rotations(batch.positions)
    e = model.prelude(batch.ids, rots, ctx)
    prepared = model.transformer["adapter"].prepare(e)
    h = batch.h0
    for t in range(start, depth):
        h = model.core(h, prepared, batch.ids, rots, ctx, t)
    logits = model.coda(h, batch.ids, rots, ctx)

    def chunk_kv(key: tuple) -> tuple[Tensor, Tensor]:
        k, v = ctx.new[key]
        return _flat_tokens(k), _flat_tokens(v)

    kv = stacked_kv(model, list(ctx.new), chunk_kv, range(start, depth))
    return DecodeResult(logits.flatten(0, 1), h.flatten(0, 1), *kv)


def verify_forward_single(
    model: Parcae,
    depth: int,
    start: int,
    batch: DecodeBatch,
    pools: tuple[Tensor, Tensor, Tensor, Tensor],
) -> DecodeResult:
    """`verify_forward` for one row, compiled apart with SINGLE_ROW_OPTIONS (measured: the C++
    wrapper takes ~15% off a 4-token verify of the built-in model)."""
    return verify_forward(model, depth, start, batch, pools)


class SpeculativeGraphs:
    """Draft graphs per (draft depth, k) and verify graphs per (depth, draft depth): compiled
    (mode "inductor"; CPU or CUDA, batch and lengths dynamic) once warmed up; verify runs
    eagerly otherwise, and drafting falls back to one decode call per token (a compile takes
    tens of seconds, so none happens while serving). Mode "eager" runs the same code uncompiled
    once warmed up (tests, debugging)."""

    def __init__(self, model: Parcae, cache: KVCache, mode: str) -> None:
        self.model, self.cache = model, cache
        self.verify_ready: set[tuple[int, int]] = set()
        self.draft_ready: set[tuple[int, int]] = set()
        self._verify = self._verify_single = self._draft = self._draft_single = None
        if mode in ("inductor", "cudagraphs"):  # CUDA graphs are not recorded for these (yet)
            compiler = compile_options(model, cache)
            options = {"fullgraph": True, "dynamic": True, "options": compiler}
            self._verify = self._verify_single = torch.compile(verify_forward, **options)
            self._draft = self._draft_single = torch.compile(draft_forward, **options)
            if mode == "inductor" and cache.outer_k.device.type == "cpu":
                single = {**options, "options": {**compiler, **SINGLE_ROW_OPTIONS}}
                self._verify_single = torch.compile(verify_forward_single, **single)
                self._draft_single = torch.compile(draft_forward_single, **single)
        elif mode == "eager":  # the graphs' code uncompiled (tests, debugging)
            self._verify = self._verify_single = verify_forward
            self._draft = self._draft_single = draft_forward

    @property
    def pools(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return pools_of(self.cache)

    def verify(self, depth: int, start: int, batch: DecodeBatch) -> DecodeResult:
        if (depth, start) not in self.verify_ready:
            fn = verify_forward
        else:
            fn = self._verify_single if len(batch.ids) == 1 else self._verify
        return fn(self.model, depth, start, self._padded(batch), self.pools)

    def draft(self, depth: int, batch: DecodeBatch) -> DraftResult:
        """Compiled (depth, k) drafts only: see `can_draft`."""
        fn = self._draft_single if len(batch.ids) == 1 else self._draft
        return fn(self.model, depth, self._padded(batch), self.pools)

    def can_draft(self, depth: int, k: int) -> bool:
        return (depth, k) in self.draft_ready

    @staticmethod
    def _padded(batch: DecodeBatch) -> DecodeBatch:
        B, L = batch.outer_rows.shape
        return pad_batch(batch, B, L, padded_slots(batch))

    def warm_prefill(self, depth: int) -> None:
        """Compile the prefill graph of `depth`: the verify graph from loop 0, for one row of
        K >= 2 new tokens (K is dynamic)."""
        if self._verify is None:
            return
        with torch.inference_mode():
            batch = dummy_batch(self.cache, self.model, depth, 1, ids=2, positions=2)
            verify_forward(self.model, depth, 0, batch, self.pools)  # derived weights first
            self.verify_ready.add((depth, 0))
            self.verify(depth, 0, batch)

    def warm(self, depth: int, draft_depth: int, k: int) -> None:
        """Compile the verify graph of (depth, draft_depth) and the draft graph of
        (draft_depth, k) on dummy rows (one row and two)."""
        if self._verify is None:
            return
        with torch.inference_mode():
            # an eager call first builds the derived weights outside the graph (`frozen`)
            def chunk(B: int) -> DecodeBatch:
                return dummy_batch(self.cache, self.model, depth, B, ids=k, positions=k)

            verify_forward(self.model, depth, draft_depth, chunk(2), self.pools)
            self.verify_ready.add((depth, draft_depth))
            self.draft_ready.add((draft_depth, k))
            for B in (1, 2):
                self.verify(depth, draft_depth, chunk(B))
                self.draft(
                    draft_depth, dummy_batch(self.cache, self.model, draft_depth, B, positions=k)
                )
