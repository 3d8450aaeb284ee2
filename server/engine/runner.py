"""Runs the model's three parts on flattened batches of in-flight token groups.

A group is the tokens one sequence brings to the recurrent block at once: a prefill chunk or one
decode token. Each group loops at its own pace (its own depth, its own loop index, its own exit
rule), so groups of different depths share every recurrent matmul and a shallow group leaves the
batch as soon as it is done (continuous depth batching). Inside a group, each token may exit on
its own; an exited token costs no more compute and writes no more K/V.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from parcae_serve.model.exit_probe import ExitProbe
from parcae_serve.model.parcae import Parcae
from parcae_serve.server.engine.decode_graph import (
    MERGE_SLACK,
    CompiledDecoder,
    DecodeBatch,
    DecodeKey,
    DecodeResult,
    KeyTensors,
    decode_key,
    flat_views,
    kv_writes,
    merge_keys,
    rows_writes,
    write_kv,
    write_rows,
)
from parcae_serve.server.engine.kv_cache import KVCache
from parcae_serve.server.engine.paged_attention import AttentionGroup, PagedAttention
from parcae_serve.server.engine.sequence import Sequence
from parcae_serve.server.engine.speculative_graph import SpeculativeGraphs

NOISE_STRIDE = 1_000_003  # seed * stride + position: per-position h_0 noise streams
NOISE_AHEAD = 32  # decode draws the h_0 of this many positions at once
_uids = itertools.count()
CODA_WAIT = 4  # loops a done token may wait to share a coda by default (coda_ready)


def coda_ready(waited: int, coda_wait: int | None, looping: list[InFlight]) -> bool:
    """Whether the tokens done with their loops go through the coda now, the oldest having
    waited `waited` loops since it was done, `looping` the groups still looping: once it has
    waited `coda_wait` loops (None: never; the caller runs the coda when every token in flight
    is done, i.e. lockstep), or at once when no looping group can finish within the loops left
    to wait (none has an exit rule or its depth that close). Waiting lets tokens that finish a
    loop or two apart share one coda, and their next tokens one prelude, instead of paying
    both on a few rows every loop (bench/RESULTS.md, "Loop-level scheduling of exits"); a
    shallow request is never held for a deep one it cannot share a coda with."""
    if coda_wait is None:
        return False
    left = coda_wait - waited
    return left <= 0 or not any(
        g.seq.request.loops.exit is not None or g.depth - g.loop <= left for g in looping
    )


@dataclass
class InFlight:
    seq: Sequence
    positions: Tensor  # (n,) long
    ids: Tensor  # (n,) long, on device
    depth: int
    prepared: Tensor | None = None  # loop-invariant injection term (n, d_rec)
    h: Tensor | None = None  # (n, d_rec)
    loop: int = 0  # loops completed
    active: Tensor | None = None  # (n,) bool: still looping
    n_active: int = 0
    loops_used: Tensor | None = None  # (n,) long
    prev_logprobs: Tensor | None = None  # (n, V): last loop's distribution (kl criterion)
    final_logits: Tensor | None = None  # (n, V): coda output already computed by kl probes
    uid: int = field(default_factory=lambda: next(_uids))
    exits: int = 0

    @property
    def done(self) -> bool:
        return self.loop >= self.depth or self.n_active == 0

    def active_index(self) -> Tensor | None:
        """Indices of the tokens still looping; None when all are (the common case)."""
        if self.n_active == len(self.positions):
            return None
        return self.active.nonzero().squeeze(1)


class ModelRunner:
    def __init__(
        self,
        model: Parcae,
        cache: KVCache,
        compile_mode: str = "off",
        exit_probe: ExitProbe | None = None,
    ) -> None:
        self.model, self.cache, self.exit_probe = model, cache, exit_probe
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_prelude = model.cfg.n_layers_in_prelude
        self._loop_key: tuple | None = None
        self._plan_key: tuple | None = None
        self._plan: tuple | None = None
        self._loop_ctx: tuple[PagedAttention, dict] | None = None
        self._like = torch.empty(0, device=self.device, dtype=self.dtype)
        self._key_tensors: dict[DecodeKey, KeyTensors] = {}
        self._flat_pools = flat_views(cache)
        self.decoder = (
            None if compile_mode == "off" else CompiledDecoder(model, cache, compile_mode)
        )
        self.spec_graphs = SpeculativeGraphs(model, cache, compile_mode)
        self._eager_decoder: CompiledDecoder | None = None
        self._looped_rows: dict[int, tuple[Tensor, Tensor]] = {}
        self.merge_slack = MERGE_SLACK  # see merge_keys (1: only equal keys share a call)

    # The compiled decode path --------------------------------------------------------------
    def compiled_key(self, g: InFlight) -> DecodeKey | None:
        """The graph that can run `g` whole, if any: one decode token, fixed depth, warmed up."""
        if self.decoder is None or len(g.positions) != 1 or g.seq.request.loops.exit is not None:
            return None
        if g.depth not in self.decoder.ready:
            return None
        return decode_key(g.depth, g.seq.table.slot)

    def can_prefill(self, g: InFlight) -> bool:
        """Whether a compiled chunk graph runs `g` whole: a prefill chunk of 2+ positions at a
        fixed depth whose prefill graph is warmed up (see `prefill`)."""
        ready = (g.depth, 0) in self.spec_graphs.verify_ready
        return ready and len(g.positions) >= 2 and g.seq.request.loops.exit is None

    @torch.inference_mode()
    def prefill(self, g: InFlight) -> Tensor:
        """A prefill chunk of K positions of one sequence in one graph call (the verify graph
        from loop 0: its prelude, all loops and coda over the chunk as one causal block, the
        past read from the pools), left done as if it had looped; returns fp32 logits (K, V).
        The eager runner takes ~600 ops for a 16-token chunk of the reference shape."""
        out = self._verify_chunks([g], 0, self._initial_state(g, self._like)[None])
        n = len(g.positions)
        g.h, g.loop, g.n_active = out.h, g.depth, n
        g.active = torch.ones(n, dtype=torch.bool)
        g.loops_used = torch.full((n,), g.depth, dtype=torch.long)
        return out.logits

    def graphs(self, depth: int) -> CompiledDecoder:
        """The decode graphs for `depth`: compiled if warmed up, else the same code eagerly."""
        if self.decoder is not None and depth in self.decoder.ready:
            return self.decoder
        if self._eager_decoder is None:
            self._eager_decoder = CompiledDecoder(self.model, self.cache, "eager")
        return self._eager_decoder

    @torch.inference_mode()
    def decode(
        self,
        groups: list[InFlight],
        keys: list[DecodeKey],
        graphs: CompiledDecoder | None = None,
        before_graph: Callable[[], None] | None = None,
    ) -> tuple[Tensor, list[tuple[int, float]]]:
        """Run single-token groups through decode graphs (`graphs`, default the compiled ones;
        one call per key) and leave them done, as if they had looped; returns fp32 logits (N, V)
        in the groups' order and, from the graphs, each row's argmax and its logprob.
        `before_graph`: called right before the first graph call (the engine hands its queued
        outputs over there, while the graph runs without the GIL)."""
        graphs = graphs or self.decoder
        logits: list[Tensor | None] = [None] * len(groups)
        greedy: list[tuple[int, float]] = [(0, 0.0)] * len(groups)
        by_key: dict[DecodeKey, list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        rows = {key: len(members) for key, members in by_key.items()}
        calls = merge_keys(rows, self.merge_slack)
        for call in calls:
            members = [i for key in call for i in by_key[key]]
            tensors = self._tensors(call[0][1])
            batch = self._decode_batch([groups[i] for i in members], tensors.slots)
            if before_graph is not None:
                before_graph()
            out = graphs(call[0][0], batch, tensors)
            self._write_kv(call, by_key, tensors, batch, out)
            top = zip(out.top_token.tolist(), out.top_logprob.tolist(), strict=True)
            for j, (i, best) in enumerate(zip(members, top, strict=True)):
                g = groups[i]
                g.h, g.loop, g.n_active = out.h[j : j + 1], g.depth, 1
                g.active, g.loops_used = self._looped(g.depth)
                logits[i], greedy[i] = out.logits[j], best
        if len(calls) == 1 and members == sorted(members):  # one call, rows in the groups' order
            return out.logits, greedy
        return torch.stack(logits), greedy

    def _write_kv(
        self,
        call: list[DecodeKey],
        by_key: dict[DecodeKey, list[int]],
        tensors: KeyTensors,
        batch: DecodeBatch,
        out: DecodeResult,
    ) -> None:
        """A graph call's new K/V into the pools: each key's rows to their own slots."""
        if len(call) == 1:
            write_kv(self._flat_pools, out.writes or kv_writes(tensors, out, *write_rows(batch)))
            return
        start = 0
        for key in call:
            rows = slice(start, start + len(by_key[key]))
            write_kv(self._flat_pools, rows_writes(self._tensors(key[1]), out, batch, rows))
            start = rows.stop

    def _looped(self, depth: int) -> tuple[Tensor, Tensor]:
        """A decoded token's `active` and `loops_used`, shared (read, never written, once the
        group is done): two tensors fewer to build per token."""
        if depth not in self._looped_rows:
            looped = torch.ones(1, dtype=torch.bool), torch.full((1,), depth, dtype=torch.long)
            self._looped_rows[depth] = looped
        return self._looped_rows[depth]

    def _decode_batch(self, groups: list[InFlight], slots: Tensor) -> DecodeBatch:
        """Graph inputs from the sequences' kept pool-row indices (never rebuilt per token)."""
        tables = [g.seq.table for g in groups]
        starts = [int(g.positions[0]) for g in groups]
        outer_rows, rec_rows = self._pool_rows(tables, starts)
        positions = torch.tensor(starts, device=self.device)
        h0 = [self._initial_state(g, self._like) for g in groups]  # (1, d_rec) each
        return DecodeBatch(
            ids=torch.cat([g.ids for g in groups]).view(-1, 1),
            positions=positions.view(-1, 1),
            h0=(h0[0] if len(h0) == 1 else torch.cat(h0)).unsqueeze(1),
            lengths=positions,
            outer_rows=outer_rows.to(self.device),
            rec_rows=rec_rows.to(self.device),
            slots=slots,
            depths=torch.tensor([g.depth for g in groups], device=self.device),
        )

    @staticmethod
    def _pool_rows(tables: list, last: list[int]) -> tuple[Tensor, Tensor]:
        """The sequences' kept pool-row indices, outer (B, L) and recurrent (S, B, L), padded to
        the longest table; `last`: the last position each row writes (checked in range)."""
        if any(p >= t.capacity for p, t in zip(last, tables, strict=True)):
            # the gather of the write rows would read padding and write another sequence's rows
            raise RuntimeError("decode position past its block table's capacity")
        if len(tables) == 1:
            return tables[0].outer_index()[None], tables[0].rec_index()[:, None]
        L = max(t.capacity for t in tables)
        outer_rows = torch.zeros(len(tables), L, dtype=torch.long)
        # tables of shallower rows in a merged call (merge_keys) have fewer slots: the rest
        # read pool row 0 in loops whose result those rows drop
        rec_rows = torch.zeros(max(t.num_slots for t in tables), len(tables), L, dtype=torch.long)
        for b, t in enumerate(tables):
            outer_rows[b, : t.capacity] = t.outer_index()
            rec_rows[: t.num_slots, b, : t.capacity] = t.rec_index()
        return outer_rows, rec_rows

    @torch.inference_mode()
    def verify(self, groups: list[InFlight], start: int) -> Tensor:
        """Finish drafted tokens at their full depth (self-speculative decoding): each group is
        K consecutive positions of one sequence whose `h` (K, d_rec) holds the states after
        `start` loops; the groups share depth, K and loop slots. Writes their K/V for loops
        `start`.. and the outer layers; returns fp32 logits (B*K, V), group by group."""
        return self._verify_chunks(groups, start, torch.stack([g.h for g in groups])).logits

    def _verify_chunks(self, groups: list[InFlight], start: int, h0: Tensor) -> DecodeResult:
        """Loops `start`.. and the coda of chunks of K positions (one per group, h0 (B, K,
        d_rec) their states after `start` loops) in the verify graph; writes their K/V."""
        depth = groups[0].depth
        batch, slots = self._chunk_batch(groups, depth, h0)
        out = self.spec_graphs.verify(depth, start, batch)
        write_kv(self._flat_pools, kv_writes(self._tensors(slots[start:]), out, *write_rows(batch)))
        return out

    @torch.inference_mode()
    def draft(self, groups: list[InFlight], depth: int) -> tuple[list[list[int]], Tensor]:
        """k greedy drafts per group in one compiled call (see `spec_graphs.can_draft`): each
        group is the k positions a sequence drafts from, `ids` its last accepted token (1,).
        Writes their K/V of loops < `depth`; returns the drafts (B lists of k) and the states
        after `depth` loops (B, k, d_rec)."""
        h0 = torch.stack([self._initial_state(g, self._like) for g in groups])
        batch, slots = self._chunk_batch(groups, depth, h0)
        out = self.spec_graphs.draft(depth, batch)
        write_kv(self._flat_pools, kv_writes(self._tensors(slots), out, *write_rows(batch)))
        return out.tokens.tolist(), out.h.view(len(groups), -1, out.h.shape[-1])

    def _chunk_batch(
        self, groups: list[InFlight], loops: int, h0: Tensor
    ) -> tuple[DecodeBatch, tuple[int, ...]]:
        """Graph inputs for groups of K consecutive positions each, and the loop slots of the
        first `loops` loops."""
        tables = [g.seq.table for g in groups]
        pos = torch.stack([g.positions for g in groups])  # (B, K)
        outer_rows, rec_rows = self._pool_rows(tables, pos[:, -1].tolist())
        slots = tuple(tables[0].slot(t) for t in range(loops))
        batch = DecodeBatch(
            ids=torch.stack([g.ids for g in groups]),
            positions=pos.to(self.device),
            h0=h0,
            lengths=torch.tensor(pos[:, 0].tolist(), device=self.device),  # stride 1
            outer_rows=outer_rows.to(self.device),
            rec_rows=rec_rows.to(self.device),
            slots=torch.tensor(slots, device=self.device),
        )
        return batch, slots

    def _tensors(self, slots: tuple[int, ...]) -> KeyTensors:
        """The kept index tensors of a K/V write to `slots` (one per loop written)."""
        key = (len(slots), slots)
        if key not in self._key_tensors:
            self._key_tensors[key] = KeyTensors.build(self.cache, slots)
        return self._key_tensors[key]

    # Stage A -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prelude(self, groups: list[InFlight]) -> None:
        """Embed + prelude + injection term + initial state for newly started groups."""
        ids, positions = self._flat(groups)
        ctx = self._ctx(groups, recurrent=False)
        e = self.model.prelude(ids, self.model.rotations(positions), ctx)
        prepared = self.model.transformer["adapter"].prepare(e)[0]
        offset = 0
        for g in groups:
            n = len(g.positions)
            g.prepared = prepared[offset : offset + n]
            g.h = self._initial_state(g, e)
            g.active = torch.ones(n, dtype=torch.bool)
            g.n_active = n
            g.loops_used = torch.zeros(n, dtype=torch.long)
            offset += n

    def _initial_state(self, g: InFlight, like: Tensor) -> Tensor:
        seq = g.seq
        if seq.request.loops.warm_start and seq.last_h is not None and len(g.positions) == 1:
            return seq.last_h.clone()
        if self.model.cfg.state_init == "zero":
            return like.new_zeros(len(g.positions), self.model.cfg.d_rec)
        positions = g.positions.tolist()
        if len(positions) > 1:  # a prefill chunk
            return self._noise(seq, positions, like)
        p = positions[0]
        first, ahead = seq.noise_ahead or (p, like[:0])
        if not first <= p < first + len(ahead):  # decode: this and the next positions' h_0
            first, ahead = seq.noise_ahead = (p, self._noise(seq, range(p, p + NOISE_AHEAD), like))
        return ahead[p - first : p - first + 1]

    def _noise(self, seq: Sequence, positions: Iterable[int], like: Tensor) -> Tensor:
        """h_0 of `positions` (N, d_rec), from per-position noise streams: chunking, preemption
        and prefix hits draw the same h_0."""
        seeds = [(seq.noise_seed * NOISE_STRIDE + p) % 2**64 for p in positions]
        return self.model.seeded_states(seeds, seq.state_gen, like)

    # Stage B -------------------------------------------------------------------------------
    @torch.inference_mode()
    def loop(self, groups: list[InFlight]) -> None:
        """One loop for every still-active token of every group."""
        idxs = [g.active_index() for g in groups]

        def gather(name: str) -> Tensor:
            parts = [
                getattr(g, name) if i is None else getattr(g, name)[i]
                for g, i in zip(groups, idxs, strict=True)
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        ctx, rots = self._loop_context(groups, idxs, gather)
        h, prepared, ids = gather("h"), gather("prepared"), gather("ids")
        new_h = self.model.core(h[None], prepared[None], ids[None], rots, ctx, loop=0)[0]
        state_exits = self._state_exits(groups, h, new_h)  # every group's rows in one pass
        kl_exits = self._kl_exits(groups, idxs, new_h)  # one coda probe for every kl group
        offset, skipped = 0, []
        for g, idx in zip(groups, idxs, strict=True):
            n = g.n_active
            out = new_h[offset : offset + n]
            exited = state_exits[offset : offset + n] if state_exits is not None else None
            offset += n
            rule = g.seq.request.loops.exit
            if rule is not None and rule.criterion == "kl":
                exited = kl_exits.get(g.uid)
            elif rule is None or g.loop + 1 < rule.min_depth:
                exited = None
            if idx is None:
                g.h = out
                g.loops_used += 1
            else:
                g.h[idx] = out
                g.loops_used[idx] += 1
            g.loop += 1
            if exited is not None and bool(exited.any()):
                gone = exited.nonzero().squeeze(1) if idx is None else idx[exited]
                g.active[gone] = False
                g.n_active -= len(gone)
                g.exits += len(gone)
                if g.loop < g.depth:
                    skipped.append((g.seq.table, g.positions[gone], g.loop - 1))
        if skipped:
            self.cache.fill_skipped(skipped)  # every group's exits in one copy

    def loop_until_coda(
        self,
        groups: list[InFlight],
        coda_wait: int | None,
        observe: Callable[[list[InFlight]], None] | None = None,
    ) -> list[InFlight]:
        """Run loops over the groups still looping until some are done and `coda_ready` says
        their coda runs now, or every group is done; returns the done groups. `observe`: called
        with each loop's looping groups (the engine's batch-size metric)."""
        waited = -1  # loops the oldest done group has waited for its coda
        while True:
            looping = [g for g in groups if not g.done]
            if looping:
                self.loop(looping)
                if observe is not None:
                    observe(looping)
            done = [g for g in groups if g.done]
            waited += bool(done)
            still = [g for g in groups if not g.done]
            if done and (not still or coda_ready(waited, coda_wait, still)):
                return done

    def _loop_context(self, groups: list[InFlight], idxs, gather) -> tuple[PagedAttention, dict]:
        """Attention indices and rotations for this loop, reused while the same tokens loop in
        the same cache slots (every loop under shared:1), since building them is pure overhead."""
        key = tuple((g.uid, g.seq.table.slot(g.loop), g.n_active) for g in groups)
        if self._loop_key == key:
            return self._loop_ctx
        sub = [
            AttentionGroup(
                g.seq.table, g.positions if i is None else g.positions[i], g.seq.table.slot(g.loop)
            )
            for g, i in zip(groups, idxs, strict=True)
        ]
        ctx = PagedAttention(self.cache, sub, recurrent=True, n_prelude=self.n_prelude)
        rots = self.model.rotations(gather("positions").to(self.device).unsqueeze(0))
        self._loop_key, self._loop_ctx = key, (ctx, rots)
        return ctx, rots

    def _state_exits(self, groups: list[InFlight], before: Tensor, after: Tensor) -> Tensor | None:
        """The exit decisions of the state rules (residual, learned) for every active row of
        every group, computed over the whole batch at once and brought to the host in one
        transfer: (rows,) bool on the CPU, or None when no group uses such a rule."""
        plan = self._exit_plan(groups)
        if plan is None:
            return None
        threshold, residual, learned = plan
        decided = None
        if residual is not False:
            after32 = after.float()  # no-op in fp32; bf16 norms are too coarse for a threshold
            size = after32.norm(dim=-1).clamp_min(1e-12)  # a zero state: ratio 0, not nan
            ratio = (after32 - before.float()).norm(dim=-1) / size
            decided = ratio < threshold if residual is True else residual & (ratio < threshold)
        if learned is not False:
            loops = {g.loop + 1 for g in groups}
            ran = (
                loops.pop()
                if len(loops) == 1
                else self._per_row([g.loop + 1 for g in groups], groups)
            )
            says = self.exit_probe.exits(before, after, ran, threshold)
            says = says if learned is True else learned & says
            decided = says if decided is None else decided | says
        return decided.cpu()

    def _exit_plan(self, groups: list[InFlight]) -> tuple | None:
        """(threshold, residual rows, learned rows) for this loop's batch: a float and True /
        False when every group shares one rule (the common case), else per-row tensors; kept
        while the same tokens loop (building it is pure overhead). None: no state rule."""
        key = tuple((g.uid, g.n_active) for g in groups)
        if self._plan_key == key:
            return self._plan
        rules = [g.seq.request.loops.exit for g in groups]
        state = [
            r if r is not None and r.criterion in ("residual", "learned") else None for r in rules
        ]
        if all(r is None for r in state):
            plan = None
        elif len({(r.criterion, r.threshold) if r else None for r in state}) == 1:
            plan = (
                state[0].threshold,
                state[0].criterion == "residual",
                state[0].criterion == "learned",
            )
        else:
            kinds = {r.criterion for r in state if r is not None}
            rows = {kind: self._per_row([bool(r) and r.criterion == kind for r in state], groups)
                    if kind in kinds else False for kind in ("residual", "learned")}  # fmt: skip
            thresholds = self._per_row([r.threshold if r else 0.0 for r in state], groups)
            plan = (thresholds, rows["residual"], rows["learned"])
        self._plan_key, self._plan = key, plan
        return plan

    def _per_row(self, values: list, groups: list[InFlight]) -> Tensor:
        """One value per group -> one per active row."""
        sizes = torch.tensor([g.n_active for g in groups], device=self.device)
        return torch.tensor(values, device=self.device).repeat_interleave(sizes)

    def _kl_exits(
        self, groups: list[InFlight], idxs: list[Tensor | None], after: Tensor
    ) -> dict[int, Tensor]:
        """Which active tokens of the kl groups stop after this loop: the coda's distribution
        after this loop against the previous loop's, probed for every kl group in one coda
        pass. `after`: the loop's new states of every group's active rows, in order. Returns
        {group uid: (n_active,) bool on the CPU} for the groups that may exit after this loop."""
        probes, offset = [], 0
        for g, idx in zip(groups, idxs, strict=True):
            rule, rows = g.seq.request.loops.exit, after[offset : offset + g.n_active]
            offset += g.n_active
            # the first comparison that may exit needs this loop's distribution next
            if rule is not None and rule.criterion == "kl" and g.loop + 2 >= rule.min_depth:
                probes.append((g, slice(None) if idx is None else idx, rows))
        if not probes:
            return {}
        logits = self._probe(probes)
        logprobs = torch.log_softmax(logits, -1)
        decided, start = {}, 0
        for g, idx, rows in probes:
            lp, lg = logprobs[start : start + len(rows)], logits[start : start + len(rows)]
            start += len(rows)
            if g.prev_logprobs is None:
                g.prev_logprobs = lp.new_empty(len(g.positions), lp.shape[-1])
                g.final_logits = torch.empty_like(g.prev_logprobs)
            prev = g.prev_logprobs[idx].clone()  # a view when idx is a slice: keep it
            g.prev_logprobs[idx] = lp
            g.final_logits[idx] = lg
            rule = g.seq.request.loops.exit
            if g.loop + 1 >= max(rule.min_depth, 2):  # every active token ran loop + 1 loops
                kl = (lp.exp() * (lp - prev)).sum(-1).clamp_min(0)  # KL(p_t || p_{t-1})
                decided[g.uid] = kl < rule.threshold
        if not decided:
            return {}
        uids = list(decided)
        flat = torch.cat([decided[u] for u in uids]).cpu()  # one transfer for every group
        return dict(zip(uids, flat.split([len(decided[u]) for u in uids]), strict=True))

    def _probe(self, probes: list[tuple[InFlight, Tensor | slice, Tensor]]) -> Tensor:
        """The coda's logits for the loop just run, every probed group's rows in one pass
        (`probes`: group, its active rows, their new states). Each token's last probe is its
        final coda pass (logits and coda K/V alike), so `coda` need not run again for kl
        groups."""
        sub = [AttentionGroup(g.seq.table, g.positions[idx]) for g, idx, _ in probes]
        ctx = PagedAttention(self.cache, sub, False, self.n_prelude)
        positions = torch.cat([g.positions[idx] for g, idx, _ in probes])
        ids = torch.cat([g.ids[idx] for g, idx, _ in probes])
        h = torch.cat([rows for _, _, rows in probes])
        rots = self.model.rotations(positions.to(self.device).unsqueeze(0))
        return self.model.coda(h.unsqueeze(0), ids.unsqueeze(0), rots, ctx)[0]

    # Stage C -------------------------------------------------------------------------------
    @torch.inference_mode()
    def coda(self, groups: list[InFlight]) -> Tensor:
        """Final states -> fp32 logits (N, V) of every token of the groups, in order."""
        # a kl probe is final only for a single token: within a chunk, a token that exited
        # early read earlier tokens' coda K/V from loops they had not finished
        todo = [g for g in groups if g.final_logits is None or len(g.positions) > 1]
        if todo:
            ids, positions = self._flat(todo)
            h = torch.cat([g.h for g in todo]).unsqueeze(0)
            ctx = self._ctx(todo, recurrent=False)
            logits = self.model.coda(h, ids, self.model.rotations(positions), ctx)[0]
            if len(todo) == len(groups):
                return logits
            sizes = [len(g.positions) for g in todo]
            for g, part in zip(todo, logits.split(sizes), strict=True):
                g.final_logits = part
        return torch.cat([g.final_logits for g in groups])

    # Helpers -------------------------------------------------------------------------------
    def _flat(self, groups: list[InFlight]) -> tuple[Tensor, Tensor]:
        ids = torch.cat([g.ids for g in groups]).unsqueeze(0)
        positions = torch.cat([g.positions for g in groups]).to(self.device).unsqueeze(0)
        return ids, positions

    def _ctx(self, groups: list[InFlight], recurrent: bool) -> PagedAttention:
        sub = [AttentionGroup(g.seq.table, g.positions) for g in groups]
        return PagedAttention(self.cache, sub, recurrent=recurrent, n_prelude=self.n_prelude)
