"""KV-cache memory: loop-slot policies, pre-allocated block pools, block tables, prefix reuse.

Two pools, sized once from a byte budget:
- the *outer* pool holds K/V of the prelude and coda layers (one entry per token);
- the *recurrent* pool holds K/V of the R recurrent layers for one loop slot (one entry per
  token and slot). A `LoopSlotPolicy` maps loop t to a slot, so memory per token is
  `outer + slots(T) * recurrent` bytes: with `shared:1` it does not grow with the depth T.

A sequence owns a list of *bundles*, one per `block_size` tokens: an outer block plus one
recurrent block per slot. Full prompt bundles are indexed by a hash chain of their tokens and
the request's cache namespace (depth, policy, exit rule, seed) and reused by later requests.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from parcae_serve.model.config import ParcaeConfig


@dataclass(frozen=True)
class LoopSlotPolicy:
    """Which cache slot loop t of a depth-T token writes and reads.

    per-loop  slot = t (exact reference semantics; T slots)
    shared:K  slot = t mod K (K=1: one slot, memory independent of T)
    first:K   loops t < K own a slot; later loops share the last one
    last:K    loops t >= T-K own a slot; earlier loops share slot 0 as scratch
    """

    kind: str
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> LoopSlotPolicy:
        name, _, arg = text.partition(":")
        if name == "per-loop" and not arg:
            return cls("per-loop")
        if name in ("shared", "first", "last") and arg.isdigit() and int(arg) >= 1:
            return cls(name, int(arg))
        raise ValueError(
            f"invalid KV policy {text!r}: use per-loop, shared:K, first:K or last:K (K >= 1)"
        )

    def __str__(self) -> str:
        return self.kind if self.kind == "per-loop" else f"{self.kind}:{self.k}"

    def num_slots(self, depth: int) -> int:
        return depth if self.kind == "per-loop" else min(self.k, depth)

    def slot(self, loop: int, depth: int) -> int:
        if self.kind == "per-loop":
            return loop
        if self.kind == "shared":
            return loop % self.k
        if self.kind == "first":
            return min(loop, self.k - 1)
        return max(0, loop - max(0, depth - self.k))


@dataclass
class Bundle:
    outer: int
    recurrent: list[int]
    refs: int = 1
    key: bytes | None = None  # set once the bundle holds a finished prompt block


@dataclass
class BlockTable:
    """One sequence's cache: bundles, plus flat token -> pool-row indices kept incrementally so
    attention gathers K/V with one index per layer and never re-stacks the cache."""

    depth: int
    policy: LoopSlotPolicy
    namespace: bytes
    num_slots: int = field(init=False, default=0)
    bundles: list[Bundle] = field(default_factory=list)
    outer_rows: list[int] = field(default_factory=list)
    rec_rows: list[list[int]] = field(default_factory=list)
    _outer_t: Tensor | None = None
    _rec_t: Tensor | None = None

    def __post_init__(self) -> None:
        self.num_slots = self.policy.num_slots(self.depth)
        self.rec_rows = [[] for _ in range(self.num_slots)]

    def slot(self, loop: int) -> int:
        return self.policy.slot(loop, self.depth)

    @property
    def exact(self) -> bool:
        """Every loop keeps its own K/V: chunked prefill and prefix reuse reproduce the no-cache
        forward. With fewer slots, earlier positions keep only their last loops' K/V."""
        return self.num_slots >= self.depth

    @property
    def capacity(self) -> int:
        return len(self.outer_rows)

    def outer_index(self) -> Tensor:
        if self._outer_t is None or len(self._outer_t) != self.capacity:
            self._outer_t = torch.tensor(self.outer_rows, dtype=torch.long)
        return self._outer_t

    def rec_index(self) -> Tensor:
        """(num_slots, capacity) pool rows of every slot."""
        if self._rec_t is None or self._rec_t.shape[1] != self.capacity:
            self._rec_t = torch.tensor(self.rec_rows, dtype=torch.long)
        return self._rec_t


def layer_shapes(cfg: ParcaeConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(kv_heads, head_dim) of the outer layers and of the recurrent layers."""
    outer = (cfg.num_key_value_heads, cfg.n_embd // cfg.num_attention_heads)
    rec = (cfg.recurrent_kv_heads, cfg.d_rec // cfg.recurrent_num_attention_heads)
    return outer, rec


def token_bytes(cfg: ParcaeConfig, dtype: torch.dtype) -> tuple[int, int]:
    """K+V bytes of one token: all outer (prelude + coda) layers, and one recurrent slot."""
    (okv, ohd), (rkv, rhd) = layer_shapes(cfg)
    es = torch.empty((), dtype=dtype).element_size()
    n_outer = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
    return 2 * n_outer * okv * ohd * es, 2 * cfg.n_layers_in_recurrent_block * rkv * rhd * es


class KVCache:
    def __init__(
        self,
        cfg: ParcaeConfig,
        policy: LoopSlotPolicy,
        budget_bytes: int,
        typical_depth: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.policy, self.block_size = policy, block_size
        (okv, ohd), (rkv, rhd) = layer_shapes(cfg)
        n_outer = cfg.n_layers_in_prelude + cfg.n_layers_in_coda
        n_rec = cfg.n_layers_in_recurrent_block
        self.outer_token_bytes, self.rec_token_bytes = token_bytes(cfg, dtype)
        slots = policy.num_slots(typical_depth)
        per_block = block_size * (self.outer_token_bytes + slots * self.rec_token_bytes)
        n_bundles = max(2, budget_bytes // per_block)
        self.num_outer_blocks, self.num_rec_blocks = n_bundles, n_bundles * slots
        rows_o, rows_r = self.num_outer_blocks * block_size, self.num_rec_blocks * block_size
        self.outer_k = torch.zeros(max(n_outer, 1), rows_o, okv, ohd, device=device, dtype=dtype)
        self.outer_v = torch.zeros_like(self.outer_k)
        self.rec_k = torch.zeros(n_rec, rows_r, rkv, rhd, device=device, dtype=dtype)
        self.rec_v = torch.zeros_like(self.rec_k)
        self.capacity_bytes = (
            self.num_outer_blocks * block_size * self.outer_token_bytes
            + self.num_rec_blocks * block_size * self.rec_token_bytes
        )
        self.free_outer = list(range(self.num_outer_blocks))[::-1]
        self.free_rec = list(range(self.num_rec_blocks))[::-1]
        self.prefix: dict[bytes, Bundle] = {}
        self.evictable: OrderedDict[bytes, Bundle] = OrderedDict()  # LRU of unreferenced blocks
        self.evictable_rec = 0  # recurrent blocks held by evictable bundles (kept, not summed)
        self.prefix_queries = self.prefix_hits = 0

    # Accounting -----------------------------------------------------------------------------
    def bundle_bytes(self, num_slots: int) -> int:
        return self.block_size * (self.outer_token_bytes + num_slots * self.rec_token_bytes)

    def token_bytes(self, depth: int, policy: LoopSlotPolicy | None = None) -> int:
        """Cache bytes per token of a depth-T sequence under a policy (default: the pool's)."""
        slots = (policy or self.policy).num_slots(depth)
        return self.outer_token_bytes + slots * self.rec_token_bytes

    def _free_blocks(self) -> tuple[int, int]:
        """(outer, recurrent) blocks that can be handed out; evictable prefix blocks count."""
        return len(self.free_outer) + len(self.evictable), len(self.free_rec) + self.evictable_rec

    @property
    def used_bytes(self) -> int:
        """Bytes held by live sequences."""
        free_o, free_r = self._free_blocks()
        return self.capacity_bytes - self.block_size * (
            free_o * self.outer_token_bytes + free_r * self.rec_token_bytes
        )

    def can_allocate(self, bundles: int, num_slots: int) -> bool:
        outer, rec = self._free_blocks()
        return outer >= bundles and rec >= bundles * num_slots

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # Allocation -----------------------------------------------------------------------------
    def new_table(
        self, depth: int, namespace: bytes, policy: LoopSlotPolicy | None = None
    ) -> BlockTable:
        """A sequence's table; a request may bring its own policy (see `allows`)."""
        return BlockTable(depth, policy or self.policy, namespace)

    def allows(self, policy: LoopSlotPolicy, depth: int) -> bool:
        """A per-request policy is safe when it needs no more slots than the server's."""
        return policy.num_slots(depth) <= self.policy.num_slots(depth)

    def _take(self, num_slots: int) -> Bundle | None:
        while len(self.free_outer) < 1 or len(self.free_rec) < num_slots:
            if not self.evictable:
                return None
            _, old = self.evictable.popitem(last=False)
            self.evictable_rec -= len(old.recurrent)
            self._release(old)
        return Bundle(self.free_outer.pop(), [self.free_rec.pop() for _ in range(num_slots)])

    def _release(self, bundle: Bundle) -> None:
        if bundle.key is not None:
            self.prefix.pop(bundle.key, None)
        self.free_outer.append(bundle.outer)
        self.free_rec.extend(bundle.recurrent)

    def _append(self, table: BlockTable, bundle: Bundle) -> None:
        bs = self.block_size
        table.bundles.append(bundle)
        table.outer_rows.extend(range(bundle.outer * bs, bundle.outer * bs + bs))
        for slot, block in enumerate(bundle.recurrent):
            table.rec_rows[slot].extend(range(block * bs, block * bs + bs))

    def ensure(self, table: BlockTable, tokens: int) -> bool:
        """Grow `table` to hold `tokens` positions; False (nothing taken) if memory is short."""
        need = self.blocks_for(tokens) - len(table.bundles)
        if need <= 0:
            return True
        if not self.can_allocate(need, table.num_slots):
            return False
        for _ in range(need):
            bundle = self._take(table.num_slots)
            assert bundle is not None  # can_allocate said so
            self._append(table, bundle)
        return True

    def free(self, table: BlockTable) -> None:
        """Drop a sequence's references; finished prompt blocks stay reusable until evicted."""
        for bundle in table.bundles:
            bundle.refs -= 1
            if bundle.refs == 0:
                if bundle.key is not None and self.prefix.get(bundle.key) is bundle:
                    self.evictable[bundle.key] = bundle
                    self.evictable_rec += len(bundle.recurrent)
                else:
                    self._release(bundle)
        table.bundles.clear()
        table.outer_rows.clear()
        table.rec_rows = [[] for _ in range(table.num_slots)]

    # Prefix reuse ---------------------------------------------------------------------------
    def _chain(self, namespace: bytes, tokens: list[int]) -> list[bytes]:
        keys, h = [], hashlib.sha256(namespace).digest()
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = tokens[start : start + self.block_size]
            h = hashlib.sha256(h + b",".join(str(t).encode() for t in block)).digest()
            keys.append(h)
        return keys

    def attach_prefix(self, table: BlockTable, prompt: list[int]) -> int:
        """Reuse cached full blocks of `prompt` (never its last token, whose logits are needed);
        returns how many positions are already computed."""
        hits = 0
        for key in self._chain(table.namespace, prompt[:-1]):
            bundle = self.prefix.get(key)
            if bundle is None:
                break
            if bundle.refs == 0:
                del self.evictable[key]
                self.evictable_rec -= len(bundle.recurrent)
            bundle.refs += 1
            self._append(table, bundle)
            hits += 1
        return hits * self.block_size

    def publish_prefix(self, table: BlockTable, prompt: list[int], computed: int) -> None:
        """Index the full prompt blocks whose K/V are final (prefilled exactly)."""
        for i, key in enumerate(self._chain(table.namespace, prompt[:computed])):
            bundle = table.bundles[i]
            if bundle.key is None and key not in self.prefix:
                bundle.key = key
                self.prefix[key] = bundle

    # Early exit -----------------------------------------------------------------------------
    def fill_skipped(self, table: BlockTable, positions: Tensor, exit_loop: int) -> None:
        """A token that stopped after `exit_loop` leaves its last K/V in the slots of the loops it
        skipped, so later tokens read what it really wrote (copy-on-exit)."""
        src = table.slot(exit_loop)
        dst = {table.slot(t) for t in range(exit_loop + 1, table.depth)} - {src}
        if not dst:
            return
        rows = table.rec_index()[:, positions]
        for slot in dst:
            self.rec_k[:, rows[slot]] = self.rec_k[:, rows[src]]
            self.rec_v[:, rows[slot]] = self.rec_v[:, rows[src]]
