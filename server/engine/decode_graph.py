"""The compiled decode path: one decode token of a batch of sequences (prelude, all T loops,
coda) as one graph.

On the CPU the graph is compiled by `torch.compile` (inductor): the ~25 small kernels of each
block fuse into a few, and Python runs once per token instead of once per op. On CUDA it is also
captured as CUDA graphs per padded batch bucket (inductor's `triton.cudagraphs`, what
`mode="reduce-overhead"` turns on), as vLLM and gpt-fast do.

The graph only *reads* the KV cache: each layer attends to the past positions' K/V straight
from the paged pools through per-row pool indices (no per-sequence copy: the index is folded
into the attention reductions) plus the token's own fresh K/V, and returns the new K/V, which
`write_kv` scatters into the pools after the graph. A token's loops never read their own token's
earlier loops from the cache, so reading before writing is exact.

The depth is static in a graph (the loops are unrolled), so there is one graph per depth; the
loop -> cache-slot mapping is an input, so that graph serves every KV policy; batch size and
context length are dynamic. Rows that need anything else (prefill chunks, exit rules, depths
not compiled) take the eager runner.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx.experimental._config
from torch import Tensor

from parcae_serve.model.parcae import Parcae, derived_weights
from parcae_serve.server.engine import cpu_kernels
from parcae_serve.server.engine.kv_cache import KVCache, copy_rows


def configure_compiler() -> None:
    """Compiler settings for the calling thread: torch keeps config overrides per thread, so
    every thread that compiles or calls a graph (the one that warms up, the engine's) calls
    this first. Without it the engine thread's first call at a new slot count recompiled for
    12 s (a guard tied the slot count to the pool's layer count). Importing dynamo takes
    ~2 s, so a server that does not compile never calls this."""
    import torch._dynamo

    # graphs are specialised per depth, and a server may warm up a few dozen depths
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # batch, context and slot counts must stay symbolic even when they happen to equal a model
    # dimension (duck sizing ties a context of 16 positions to a head size of 16)
    torch.fx.experimental._config.use_duck_shape = False
    # the graphs' floats are model constants; a symbolic float restarts dynamo's analysis,
    # which `aot_compile` cannot do
    torch._dynamo.config.specialize_float = True
    # memory planning's allocation tree nests once per live buffer and its passes recurse
    # through it: a one-row graph of the reference shape at T=8 (~500 buffers) failed with
    # RecursionError at the 2,000 frames inductor asks for
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


@dataclass
class DecodeBatch:
    """Inputs of one decode graph call: B sequences, one token each, same depth and slots.

    ids, positions: (B, 1) long; h0: (B, 1, d_rec) initial states; lengths: (B,) past positions
    (= positions); outer_rows: (B, L) pool rows of the past positions in the outer pool;
    rec_rows: (S, B, L) the same in the recurrent pool, per loop slot; slots: (T,) the slot of
    each loop. Rows at or past a sequence's length are padding (masked). depths: (B,) each
    row's own depth, for a call that decodes rows of several depths at the deepest one's (see
    `merge_keys`): a row keeps its state after its own last loop (None: every row loops `depth`
    times).
    """

    ids: Tensor
    positions: Tensor
    h0: Tensor
    lengths: Tensor
    outer_rows: Tensor
    rec_rows: Tensor
    slots: Tensor
    depths: Tensor | None = None


@dataclass
class KVWrites:
    """A call's new K/V as rows of the flattened pools (`flat_views`): outer_idx (N_o,) rows
    and outer_k, outer_v (N_o, Hkv*hd); rec_idx (N_r,) and rec_k, rec_v (N_r, Hkv_rec*hd_rec),
    each slot getting the K/V of the last loop mapped to it. `write_kv` copies them in."""

    outer_idx: Tensor
    outer_k: Tensor
    outer_v: Tensor
    rec_idx: Tensor
    rec_k: Tensor
    rec_v: Tensor


@dataclass
class DecodeResult:
    """logits: (B, V) fp32; h: (B, d_rec) final states; outer_kv: ((P+C), B, Hkv, hd) K and V;
    rec_kv: (T, R, B, Hkv_rec, hd_rec) K and V of every loop. A decode graph given the write
    indices also returns `writes` (the same K/V as pool rows) and each row's argmax token and
    its logprob, `top_token` (B,) and `top_logprob` (B,): with those a greedy token costs no
    op outside the graph (each costs ~10 us there: the graph has just evicted the caches)."""

    logits: Tensor
    h: Tensor
    outer_k: Tensor
    outer_v: Tensor
    rec_k: Tensor
    rec_v: Tensor
    writes: KVWrites | None = None
    top_token: Tensor | None = None
    top_logprob: Tensor | None = None


class PoolReadAttention:
    """AttentionContext for single-token rows: past K/V read in place from the pools, own K/V
    from the call; the new K/V are recorded, not written. `fused`: attend with the CPU kernel
    (`cpu_kernels.decode_attention`) instead of torch ops."""

    def __init__(
        self,
        pools: tuple[Tensor, Tensor, Tensor, Tensor],
        batch: DecodeBatch,
        n_prelude: int,
        fused: bool = False,
    ) -> None:
        self.outer_k, self.outer_v, self.rec_k, self.rec_v = pools
        self.batch, self.n_prelude, self.fused = batch, n_prelude, fused
        L = batch.outer_rows.shape[1]
        keys = torch.arange(L, device=batch.lengths.device)
        self.invalid = (keys[None, :] >= batch.lengths[:, None])[:, :, None, None]  # (B,L,1,1)
        self.new: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _past(self, key: tuple) -> tuple[Tensor, Tensor, Tensor]:
        if key[0] == "core_block":
            i, loop = key[1], key[2]
            # the slot is data, not a constant: one graph serves every policy at this depth
            slot = self.batch.slots[loop : loop + 1]
            return self.rec_k[i], self.rec_v[i], self.batch.rec_rows.index_select(0, slot)[0]
        layer = key[1] if key[0] == "prelude" else self.n_prelude + key[1]
        return self.outer_k[layer], self.outer_v[layer], self.batch.outer_rows

    def _as_stored(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The call's own K/V rounded as the pools store them (--kv-cache-dtype): what graphs
        attend to and write is what the eager runner writes and reads back."""
        return k.to(self.outer_k.dtype), v.to(self.outer_k.dtype)

    def attend(self, key: tuple, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        pool_k, pool_v, rows = self._past(key)
        k, v = self._as_stored(k, v)
        self.new[key] = (k, v)
        B, H, _, hd = q.shape
        if self.fused:  # (B, H, 1, hd) -> (B, H, hd) and back
            out = cpu_kernels.decode_attention(
                q[:, :, 0].float(), k[:, :, 0], v[:, :, 0], pool_k, pool_v, rows,
                self.batch.lengths, hd**-0.5,
            )  # fmt: skip
            return out[:, :, None].to(q.dtype)
        Hkv = k.shape[1]
        g = H // Hkv
        qf = q.float().view(B, Hkv, g, hd) * hd**-0.5
        kp, vp = pool_k[rows].float(), pool_v[rows].float()  # (B, L, Hkv, hd), fused reads
        s_past = (qf[:, None] * kp[:, :, :, None, :]).sum(-1)  # (B, L, Hkv, g)
        s_past = s_past.masked_fill(self.invalid, float("-inf"))
        s_self = (qf * k.float().view(B, Hkv, 1, hd)).sum(-1)  # (B, Hkv, g)
        m = torch.maximum(s_past.amax(1), s_self)
        p_past, p_self = torch.exp(s_past - m[:, None]), torch.exp(s_self - m)
        denom = p_past.sum(1) + p_self
        out = (p_past[..., None] * vp[:, :, :, None, :]).sum(1)
        out = (out + p_self[..., None] * v.float().view(B, Hkv, 1, hd)) / denom[..., None]
        return out.view(B, H, 1, hd).to(q.dtype)


def decode_forward(
    model: Parcae,
    depth: int,
    batch: DecodeBatch,
    pools: tuple[Tensor, Tensor, Tensor, Tensor],
    fused: bool = False,
    key: KeyTensors | None = None,
) -> DecodeResult:
    """One token per row through prelude, `depth` loops and coda; reads pools, writes none.
    `fused`: attention by the CPU kernel (see PoolReadAttention). With `key` (the write indices
    of `batch.slots`) the result also holds the K/V writes and the greedy token."""
    ctx = PoolReadAttention(pools, batch, model.cfg.n_layers_in_prelude, fused)
    rots = model.rotations(batch.positions)
    e = model.prelude(batch.ids, rots, ctx)
    prepared = model.transformer["adapter"].prepare(e)
    h = batch.h0
    for t in range(depth):
        looped = model.core(h, prepared, batch.ids, rots, ctx, t)
        # a row past its own depth keeps its state; its K/V of these loops are never written
        if batch.depths is not None:
            looped = torch.where(batch.depths.view(-1, 1, 1) > t, looped, h)
        h = looped
    logits = model.coda(h, batch.ids, rots, ctx)[:, 0]

    def token_kv(key: tuple) -> tuple[Tensor, Tensor]:  # (B, Hkv, 1, hd) -> (B, Hkv, hd)
        k, v = ctx.new[key]
        return k[:, :, 0], v[:, :, 0]

    kv = stacked_kv(model, list(ctx.new), token_kv, range(depth))
    out = DecodeResult(logits, h[:, 0], *kv)
    if key is not None:
        out.writes = kv_writes(key, out, *write_rows(batch))
        top = logits.max(-1)
        out.top_token, out.top_logprob = top.indices, top.values - logits.logsumexp(-1)
    return out


def write_rows(batch: DecodeBatch) -> tuple[Tensor, Tensor]:
    """The pool rows of a batch's new K/V, those of its positions (B, K): outer (B*K,),
    recurrent (S, B*K)."""
    at = batch.positions
    rec_at = at.expand(batch.rec_rows.shape[0], -1, -1)
    return batch.outer_rows.gather(1, at).view(-1), batch.rec_rows.gather(2, rec_at).flatten(1)


def stacked_kv(
    model: Parcae, keys: list[tuple], kv_of: Callable[[tuple], tuple[Tensor, Tensor]], loops: range
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A graph call's new K/V as `write_kv` takes them: outer K and V (P+C, N, Hkv, hd), the
    outer layers in call order (`keys`: the attention keys the call recorded), and recurrent K
    and V (len(loops), R, N, Hkv_rec, hd_rec); `kv_of(key)` gives one layer's (N, Hkv, hd)."""
    outer = [kv_of(k) for k in keys if k[0] != "core_block"]
    R = model.cfg.n_layers_in_recurrent_block
    rec = [[kv_of(("core_block", i, t)) for i in range(R)] for t in loops]
    return (
        torch.stack([k for k, _ in outer]),
        torch.stack([v for _, v in outer]),
        torch.stack([torch.stack([k for k, _ in loop]) for loop in rec]),
        torch.stack([torch.stack([v for _, v in loop]) for loop in rec]),
    )


def decode_forward_single(
    model: Parcae,
    depth: int,
    batch: DecodeBatch,
    pools: tuple[Tensor, Tensor, Tensor, Tensor],
    fused: bool = False,
    key: KeyTensors | None = None,
) -> DecodeResult:
    """`decode_forward` for a batch of exactly one row (one stream), compiled apart with
    SINGLE_ROW_OPTIONS (a function of its own, so its compiled code never mixes with the batched
    graph's)."""
    return decode_forward(model, depth, batch, pools, fused, key)


@dataclass
class KeyTensors:
    """The index tensors of one decode key, built once: slots (T,) the slot of each loop;
    last_loops, last_slots (S' >= 2,) for each slot written, the last loop mapped to it (later
    loops overwrite earlier ones' K/V in a shared slot; a lone slot is listed twice);
    outer_base (P+C, 1) and rec_base (1, R, 1) the first row of each layer in the flattened
    pools."""

    slots: Tensor
    last_loops: Tensor
    last_slots: Tensor
    outer_base: Tensor
    rec_base: Tensor

    @classmethod
    def build(cls, cache: KVCache, slots: tuple[int, ...]) -> KeyTensors:
        device = cache.outer_k.device
        last = {s: t for t, s in enumerate(slots)}
        if len(last) == 1:  # a compiler specialises size 1: write the one slot twice
            last = {**last, -1: last[slots[0]]}
        n_outer, rows_o = cache.outer_k.shape[:2]
        n_rec, rows_r = cache.rec_k.shape[:2]
        return cls(
            torch.tensor(slots, device=device),
            torch.tensor(list(last.values()), device=device),
            torch.tensor([slots[t] for t in last.values()], device=device),
            torch.arange(n_outer, device=device)[:, None] * rows_o,
            torch.arange(n_rec, device=device)[None, :, None] * rows_r,
        )


def kv_writes(
    key: KeyTensors, out: DecodeResult, outer_write: Tensor, rec_write: Tensor
) -> KVWrites:
    """A call's new K/V (`out`) as rows of the flattened pools: every outer layer at
    `outer_write` (B,) rows, and for each slot the K/V of the last loop mapped to it at
    `rec_write[slot]` (S, B)."""
    outer_idx = (key.outer_base + outer_write).view(-1)  # (P+C) * B rows of the flat pool
    rec_idx = (key.rec_base + rec_write.index_select(0, key.last_slots)[:, None, :]).view(-1)
    n_o, n_r = len(outer_idx), len(rec_idx)
    rec_k = out.rec_k.index_select(0, key.last_loops).reshape(n_r, -1)
    rec_v = out.rec_v.index_select(0, key.last_loops).reshape(n_r, -1)
    outer_k, outer_v = out.outer_k.reshape(n_o, -1), out.outer_v.reshape(n_o, -1)
    return KVWrites(outer_idx, outer_k, outer_v, rec_idx, rec_k, rec_v)


def rows_writes(key: KeyTensors, out: DecodeResult, batch: DecodeBatch, rows: slice) -> KVWrites:
    """The K/V writes of `rows` of a call that ran rows of several keys (`merge_keys`), to the
    slots of their own key (`key`): for each, the K/V of the last loop they ran that maps to it."""
    part = DecodeResult(out.logits[rows], out.h[rows], out.outer_k[:, rows], out.outer_v[:, rows],
                        out.rec_k[:, :, rows], out.rec_v[:, :, rows])  # fmt: skip
    sub = DecodeBatch(batch.ids[rows], batch.positions[rows], batch.h0[rows],
                      batch.lengths[rows], batch.outer_rows[rows], batch.rec_rows[:, rows],
                      key.slots)  # fmt: skip
    return kv_writes(key, part, *write_rows(sub))


def write_kv(flat_pools: tuple[Tensor, Tensor, Tensor, Tensor], w: KVWrites) -> None:
    """Copy `w` into the pools, each seen as one (layers * rows, heads * hd) table
    (`flat_pools`, see `flat_views`)."""
    outer_k, outer_v, rec_k, rec_v = flat_pools
    copy_rows(outer_k, w.outer_idx, w.outer_k)
    copy_rows(outer_v, w.outer_idx, w.outer_v)
    copy_rows(rec_k, w.rec_idx, w.rec_k)
    copy_rows(rec_v, w.rec_idx, w.rec_v)


def pools_of(cache: KVCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four pools a graph reads: outer K, outer V, recurrent K, recurrent V."""
    return cache.outer_k, cache.outer_v, cache.rec_k, cache.rec_v


def flat_views(cache: KVCache) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four pools (layers, rows, heads, hd) as (layers * rows, heads * hd) views."""
    return tuple(p.view(-1, p.shape[-2] * p.shape[-1]) for p in pools_of(cache))


DecodeKey = tuple[int, tuple[int, ...]]  # (depth, loop -> slot): rows batched together
MERGE_SLACK = 1.5  # see merge_keys


def decode_key(depth: int, slot_of) -> DecodeKey:
    return depth, tuple(slot_of(t) for t in range(depth))


def merge_keys(rows: dict[DecodeKey, int], slack: float = MERGE_SLACK) -> list[list[DecodeKey]]:
    """The graph calls of one decode step: each a list of keys whose rows run together at its
    first (deepest) key's depth, the others' rows keeping their state after their own last loop.

    A key joins a deeper call when its loop slots are a prefix of that call's (so its rows read
    and write their own slots in the loops they run: per-loop, shared:K and first:K policies)
    and the call then loops at most `slack` times the row-loops its rows need. `rows`: the rows
    of each key. Why: a matmul of 11 rows runs at about half the rate of one of 32 on a small
    CPU (bench/RESULTS.md), so 32 streams of three depths cost more as three calls than as one
    that loops some rows in vain."""
    calls: list[list[DecodeKey]] = []
    for key in sorted(rows, key=lambda k: -k[0]):
        for call in calls:
            depth, slots = call[0]
            fits = slots[: key[0]] == key[1]
            needed = sum(k[0] * rows[k] for k in call) + key[0] * rows[key]
            if fits and depth * (sum(rows[k] for k in call) + rows[key]) <= slack * needed:
                call.append(key)
                break
        else:
            calls.append([key])
    return calls


class CompiledDecoder:
    """Compiled decode graphs, one per depth, warmed up before the server is ready.

    mode "inductor": `torch.compile` with dynamic batch and context (CPU); "cudagraphs": also
    CUDA graphs, with batch and context padded to buckets so a few recorded graphs serve every
    step; "eager": the same function uncompiled (tests, debugging). Depths not warmed up are not compiled while serving (a compile
    takes tens of seconds): `ready` says which depths the engine may send here.
    """

    def __init__(self, model: Parcae, cache: KVCache, mode: str) -> None:
        self.model, self.cache, self.mode = model, cache, mode
        # every row attends with the CPU kernel where it is built. One row over fp32 pools
        # kept inductor's attention until the kernel matched it at short context: over HTTP
        # (built-in, T=6, 2 threads) the kernel's row is within noise of inductor's at 64 and
        # 256 positions and 1.15x / 1.23-1.30x faster at 512 / 900, where a layer's K/V no
        # longer fit L2 and inductor's loop reads them once per head (bench/RESULTS.md)
        self.fused = fused_attention_fits(cache)
        self.ready: set[int] = set()
        # inductor on the CPU: graphs compiled ahead, called without dynamo (see _graph)
        self.ahead = mode == "inductor" and cache.outer_k.device.type == "cpu"
        self._ahead: dict[tuple[int, bool, bool], Callable] = {}
        self._checked: set[tuple] = set()
        model.requires_grad_(False)  # serving only: no autograd bookkeeping around the graph
        if mode in ("inductor", "cudagraphs"):
            configure_compiler()  # the constructing thread
            # CUDA graphs are recorded per padded shape; the pools keep their address, so the
            # graphs read them in place instead of copying them into static buffers
            options = {**compile_options(model, cache), "triton.cudagraphs": mode == "cudagraphs"}
            if mode == "cudagraphs":
                for pool in self.pools:
                    torch._dynamo.mark_static_address(pool)
            self._fn = torch.compile(decode_forward, fullgraph=True, dynamic=True, options=options)
            self._fn_single = self._fn
            if self.ahead:
                single = {**options, **SINGLE_ROW_OPTIONS}
                self._fn_single = torch.compile(
                    decode_forward_single, fullgraph=True, dynamic=True, options=single
                )
                ahead = {"guard_filter_fn": guards_ahead}
                planned = {**single, **PLANNED_OPTIONS}
                self._ahead_fns = {
                    kind: torch.compile(fn, fullgraph=True, dynamic=True, options={**opts, **ahead})
                    for kind, fn, opts in (
                        ("batch", decode_forward, options),
                        ("single", decode_forward_single, single),
                        ("planned", decode_forward_single, planned),
                    )
                }
        elif mode == "eager":
            self._fn = self._fn_single = decode_forward
        else:
            raise ValueError(f"unknown compile mode {mode!r}: off, eager, inductor or cudagraphs")

    @property
    def pools(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return pools_of(self.cache)

    def __call__(self, depth: int, batch: DecodeBatch, key: KeyTensors) -> DecodeResult:
        """Decode `batch` at `depth`; `key`: the write indices of its slots (the result holds
        the writes, except for rows padded to a CUDA graph bucket: `kv_writes` then)."""
        B, L = batch.outer_rows.shape
        # rows are padded only to CUDA graph buckets (a batch of one has its own graph, see
        # decode_forward_single)
        S = padded_slots(batch)
        if self.mode == "cudagraphs":
            padded = pad_batch(batch, bucket(B, BATCH_BUCKETS), bucket(L), S)
        else:
            padded = pad_batch(batch, B, L, S)
        fused = self.fused
        args = (self.model, depth, padded, self.pools, fused, key)
        out = self._graph(depth, B, S, fused, key, args)(*args)
        if padded.lengths.shape[0] != B:  # writes of padding rows would land in row 0
            kv = (t[..., :B, :, :] for t in (out.outer_k, out.outer_v, out.rec_k, out.rec_v))
            top = out.top_token[:B], out.top_logprob[:B]
            out = DecodeResult(out.logits[:B], out.h[:B], *kv, None, *top)  # K/V: batch is 3rd-last
        if self.mode == "cudagraphs":  # the next replay reuses the output memory
            out = cloned(out)
        return out

    def _graph(
        self, depth: int, B: int, S: int, fused: bool, key: KeyTensors, args: tuple
    ) -> Callable:
        """The callable for these inputs. Dynamo checks ~100 guards on every call of a compiled
        function (~0.15 ms a token on the reference shape, bench/RESULTS.md); a graph compiled
        ahead (`aot_compile`) is called without them, its guards checked once per kind of
        input (depth, one row or many, attention path, slot counts), where dynamo would have
        specialised; inputs that fail them take dynamo's function, which compiles anew."""
        fn = self._fn_single if B == 1 else self._fn
        ahead = self._ahead.get((depth, B == 1, fused))
        if ahead is None:
            return fn
        kind = (depth, B == 1, fused, len(key.last_loops), S)
        if kind not in self._checked:
            if not ahead.guard_check(*args):
                return fn
            self._checked.add(kind)
        return ahead

    def _compile_ahead(self, depth: int, rows: int, key: KeyTensors) -> None:
        batch = dummy_batch(self.cache, self.model, depth, rows, row_depths=True)
        fused = self.fused
        kind = "batch" if rows > 1 else "planned" if depth <= PLANNED_MAX_DEPTH else "single"
        fn = self._ahead_fns[kind]
        compiled = fn.aot_compile(((self.model, depth, batch, self.pools, fused, key), {}))
        compiled.disable_guard_check()  # checked in _graph instead
        self._ahead[(depth, rows == 1, fused)] = compiled

    def warm(self, depth: int) -> None:
        """Compile `depth` by running it on dummy rows."""
        with torch.inference_mode():  # as when serving: inference tensors guard differently
            if not self.ready:  # derived weights (fused QKV, decay) built once, outside graphs
                dummy = dummy_batch(self.cache, self.model, depth, 2, row_depths=True)
                decode_forward(self.model, depth, dummy, self.pools, self.fused)
                if self.mode == "cudagraphs":
                    for weight in derived_weights(self.model):
                        torch._dynamo.mark_static_address(weight)
                mark_fixed_shapes(self.model, self.pools)
            key = KeyTensors.build(self.cache, (0,) * depth)
            for rows in (1, 2):  # one stream has a graph of its own (see decode_forward_single)
                if self.ahead and hasattr(self._fn, "aot_compile"):  # torch >= 2.10
                    self._compile_ahead(depth, rows, key)
                self(depth, dummy_batch(self.cache, self.model, depth, rows, row_depths=True), key)
        self.ready.add(depth)


def mark_fixed_shapes(model: Parcae, pools: tuple[Tensor, ...]) -> None:
    """Keep the shapes of tensors that never change while serving (the K/V pools, the rotation
    tables) out of the graphs' symbolic sizes: with `dynamic=True` each of their dimensions
    would be one more size argument, and the C++ wrapper boxes every size argument into a
    tensor on every call (10 of the 17 on the reference shape)."""
    for tensor in (*pools, *model.rope_tables()):
        torch._dynamo.mark_static(tensor)


def cloned(out: DecodeResult) -> DecodeResult:
    """`out` with every tensor copied (a CUDA graph's outputs are overwritten by its next
    replay)."""
    fields = {k: v.clone() if isinstance(v, Tensor) else v for k, v in vars(out).items()}
    if out.writes is not None:
        fields["writes"] = KVWrites(*(t.clone() for t in vars(out.writes).values()))
    return DecodeResult(**fields)


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def fused_attention_fits(cache: KVCache) -> bool:
    """Whether decode graphs over `cache` attend with the CPU kernel: pools on the CPU (fp32,
    fp16, bf16 or fp8 e4m3), and the kernel built (`cpu_kernels.available`)."""
    pool = cache.outer_k
    return pool.device.type == "cpu" and pool.dtype in KERNEL_DTYPES and cpu_kernels.available()


def padded_slots(batch: DecodeBatch) -> int:
    """Slots a graph call gets: a compiler specialises size 1, so one slot is padded to 2."""
    return max(len(batch.rec_rows), 2)


def dummy_batch(
    cache: KVCache,
    model: Parcae,
    depth: int,
    B: int,
    ids: int = 1,
    positions: int = 1,
    row_depths: bool = False,
) -> DecodeBatch:
    """B rows of `ids` tokens at `positions` positions that attend to nothing in the pools
    (every past position masked): what warm-up compiles on. States in the model's dtype (the
    pools may store K/V in another, --kv-cache-dtype). `row_depths`: with each row's depth,
    as the engine's decode calls bring them."""
    device, dtype, d_rec = cache.outer_k.device, next(model.parameters()).dtype, model.cfg.d_rec
    L = cache.block_size

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=torch.long, device=device)

    h0 = torch.zeros(B, positions, d_rec, dtype=dtype, device=device)
    depths = zeros(B) + depth if row_depths else None
    return DecodeBatch(zeros(B, ids), zeros(B, positions), h0, zeros(B), zeros(B, L),
                       zeros(2, B, L), zeros(depth), depths)  # fmt: skip


def keep_model_identity_guards(entries: list) -> list[bool]:
    """Dynamo guards every parameter of the model by default (~100 tensor checks, ~0.2 ms per
    call). The weights do not change while serving, so those guards go; the guard on which
    model object it is stays, because the graph reads the derived weights (`frozen`) that
    model built."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    return [k or e.name == "L['model']" for e, k in zip(entries, keep, strict=True)]


def guards_ahead(entries: list) -> list[bool]:
    """Guards of a graph compiled ahead: none on the model (each decoder keeps the graphs it
    compiled for its model), and none `aot_compile` cannot serialise."""
    keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [
        k and not e.is_global and e.guard_type not in unsupported
        for e, k in zip(entries, keep, strict=True)
    ]


COMPILE_OPTIONS = {
    "guard_filter_fn": keep_model_identity_guards,
    "cpp.weight_prepack": False,  # measured: MKL's packed GEMM costs more than plain mm at M<=32
}


def compile_options(model: Parcae, cache: KVCache) -> dict:
    """COMPILE_OPTIONS, and where the pools store K/V in another dtype than the model's
    (--kv-cache-dtype) `emulate_precision_casts`: the graphs round a token's own K/V to the
    pool's dtype and read them back (`k.to(fp16).float()`), and by default inductor drops
    such a round trip (its C++ code reuses the fp32 value, Triton computes in fp32), so the
    compiled path would attend to unrounded K/V where the eager runner reads rounded ones."""
    if cache.outer_k.dtype == next(model.parameters()).dtype:
        return dict(COMPILE_OPTIONS)
    return {**COMPILE_OPTIONS, "emulate_precision_casts": True}


# One row on the CPU: with the batch a constant 1 every matmul is a matrix-vector product, which
# inductor then writes (weight dimensions up to 2048; larger ones stay BLAS) as a vectorised
# dot-product loop fused with its neighbours instead of calling `mm` (~9 us of dispatch each,
# ~80 a token on the reference shape, whose whole token becomes two C++ kernels); the C++
# wrapper replaces the Python one's per-buffer calls. Batches of 2 or more keep `mm`, which
# reads each weight once for all rows.
SINGLE_ROW_OPTIONS = {
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
    "cpp_wrapper": True,
}
# One row compiled ahead at a shallow depth: inductor's memory planning puts the graph's ~500
# intermediates (reference shape, T=8) in one pool allocated once a call, instead of a malloc and
# a free each: +8% tokens/s in-process (bench/RESULTS.md). Its planner is quadratic in the
# buffers alive at once (compile, reference shape: T=8 61 -> 81 s, T=16 105 -> 294 s), so deeper
# graphs, and graphs compiled on demand inside a request, go without it.
PLANNED_OPTIONS = {"memory_planning": True}
PLANNED_MAX_DEPTH = 8
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int, sizes: tuple[int, ...] = ()) -> int:
    """The smallest bucket >= n: from `sizes`, else the next multiple of 256."""
    return next((s for s in sizes if s >= n), -(-n // 256) * 256)


def pad_batch(batch: DecodeBatch, B: int, L: int, S: int) -> DecodeBatch:
    """Pad to B rows, L context columns, S slots: extra rows attend to nothing, extra columns
    are past every length, extra slots are never read."""
    if batch.rec_rows.shape == (S, B, L):
        return batch

    def pad(t: Tensor, dim: int, size: int) -> Tensor:
        shape = list(t.shape)
        shape[dim] = size - t.shape[dim]
        return t if shape[dim] == 0 else torch.cat([t, t.new_zeros(shape)], dim)

    return DecodeBatch(
        pad(batch.ids, 0, B),
        pad(batch.positions, 0, B),
        pad(batch.h0, 0, B),
        pad(batch.lengths, 0, B),
        pad(pad(batch.outer_rows, 0, B), 1, L),
        pad(pad(pad(batch.rec_rows, 0, S), 1, B), 2, L),
        batch.slots,
        None if batch.depths is None else pad(batch.depths, 0, B),
    )
