"""KV-cache memory: loop-slot policies, pre-allocated block pools, block tables, prefix reuse.

Two pools, sized once from a byte budget:
- the *outer* pool holds K/V of the prelude and coda layers (one entry per token);
- the *recurrent* pool holds K/V of the R recurrent layers for one loop slot (one entry per
  token and slot). A `LoopSlotPolicy` maps loop t to a slot, so memory per token is
  `outer + slots(T) * recurrent` bytes: with `shared:1` it does not grow with the depth T.

A sequence owns a list of *bundles*, one per `block_size` tokens: an outer block plus one
recurrent block per slot. While its prompt is being prefilled a sequence keeps every loop's K/V
(per-loop layout), so prompts prefill in chunks and full prompt bundles can be reused exactly
under any policy: they are indexed by a hash chain of their tokens and the request's cache
namespace (depth, exit rule, seed). Once the prompt is done, `finish_prefill` keeps only the
slots the policy keeps (for each slot, the last loop mapped to it: what a one-chunk prefill
would have left there) and releases the others, except in published prefix bundles, which keep
every loop for later requests (an LRU, evicted before any allocation fails).

A preempted sequence's K/V are swapped to host memory and copied back when it resumes, so a
lossy policy's decode-time cache (which no exact recompute reproduces) survives preemption.
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
    upto: int = 0  # lossy only for depths <= upto (0: every depth); deeper tokens keep every loop

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

    def exact_at(self, depth: int) -> bool:
        return self.kind == "per-loop" or 0 < self.upto < depth

    def num_slots(self, depth: int) -> int:
        return depth if self.exact_at(depth) else min(self.k, depth)

    def fits_within(self, server: LoopSlotPolicy, depth: int) -> bool:
        """Whether this (a request's or preset's) policy needs no more cache slots at `depth`
        than the server's: only then can it share the server's cache."""
        return self.num_slots(depth) <= server.num_slots(depth)

    def slot(self, loop: int, depth: int) -> int:
        if self.exact_at(depth):
            return loop
        if self.kind == "shared":
            return loop % self.k
        if self.kind == "first":
            return min(loop, self.k - 1)
        return max(0, loop - max(0, depth - self.k))

    def kept_loops(self, depth: int) -> list[int]:
        """For each slot, the last loop mapped to it: whose K/V the slot holds at the end."""
        last = {self.slot(t, depth): t for t in range(depth)}
        return [last[s] for s in range(self.num_slots(depth))]


PER_LOOP = LoopSlotPolicy("per-loop")


def choose_policy(
    calibration: dict | None, max_nll_cost: float, default_depth: int
) -> tuple[LoopSlotPolicy, str]:
    """`--kv-policy auto`: the measured policy with the fewest bytes per token whose held-out
    NLL cost (vs per-loop, decoding through the cache) is within `max_nll_cost` at the default
    depth, lossy only up to the deepest depth where every measurement is within the bound;
    per-loop when nothing measured qualifies. Returns the policy and the reason, in words."""
    rows = (calibration or {}).get("kv_policies", {}).get("rows", [])
    if not rows:
        return PER_LOOP, "per-loop (exact): the checkpoint has no measured KV-policy table"
    best = None
    for name in sorted({r["policy"] for r in rows} - {"per-loop"}):
        measured = sorted((r["depth"], r) for r in rows if r["policy"] == name)
        upto = 0
        for depth, row in measured:
            if row["nll_cost"] > max_nll_cost:
                break
            upto = depth
        at_default = [r for d, r in measured if d == default_depth]
        if upto < default_depth or not at_default:
            continue
        key = (at_default[0]["bytes_per_token"], at_default[0]["nll_cost"])
        if best is None or key < best[0]:
            best = (key, LoopSlotPolicy.parse(name), upto, at_default[0]["nll_cost"])
    if best is None:
        return PER_LOOP, (
            f"per-loop (exact): no measured policy costs <= {max_nll_cost:.2%} held-out NLL at "
            f"the default depth {default_depth}"
        )
    _, policy, upto, cost = best
    policy = LoopSlotPolicy(policy.kind, policy.k, upto)
    return policy, (
        f"{policy} for depths <= {upto}, per-loop above: measured {cost:+.2%} held-out NLL at "
        f"depth {default_depth} (bound {max_nll_cost:.2%}), the fewest bytes per token within it"
    )


@dataclass
class Bundle:
    outer: int
    recurrent: list[int]
    refs: int = 1
    key: bytes | None = None  # set once the bundle holds a finished prompt block
    loops: list[int] = field(default_factory=list)  # a published block's loops per position


@dataclass
class BlockTable:
    """One sequence's cache: bundles, plus flat token -> pool-row indices kept incrementally so
    attention gathers K/V with one index per layer and never re-stacks the cache."""

    depth: int
    policy: LoopSlotPolicy
    namespace: bytes
    prefilling: bool = False  # per-loop layout until the prompt is done (see finish_prefill)
    num_slots: int = field(init=False, default=0)
    bundles: list[Bundle] = field(default_factory=list)
    outer_rows: list[int] = field(default_factory=list)
    rec_rows: list[list[int]] = field(default_factory=list)
    _outer_t: Tensor | None = None
    _rec_t: Tensor | None = None

    def __post_init__(self) -> None:
        self.num_slots = self.layout.num_slots(self.depth)
        self.rec_rows = [[] for _ in range(self.num_slots)]

    @property
    def layout(self) -> LoopSlotPolicy:
        """The slot mapping in force now: every loop its own slot while prefilling."""
        return PER_LOOP if self.prefilling else self.policy

    def slot(self, loop: int) -> int:
        return self.layout.slot(loop, self.depth)

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


@dataclass
class SwappedKV:
    """A preempted sequence's K/V in host memory: outer (layers, n, heads, hd) and recurrent
    (layers, slots, n, heads, hd), in the table layout they were taken from."""

    positions: int
    prefilling: bool
    outer_k: Tensor
    outer_v: Tensor
    rec_k: Tensor
    rec_v: Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.outer_k, self.outer_v, self.rec_k, self.rec_v))


def copy_rows(table: Tensor, index: Tensor, rows: Tensor) -> None:
    """`table.index_copy_(0, index, rows)`, `rows` rounded to the table's dtype (a pool's K/V
    as --kv-cache-dtype stores them). One-byte (fp8) tables are written as their bytes: torch
    has no CPU index_copy_ for float8."""
    rows = rows.to(table.dtype)
    if table.element_size() == 1 and table.is_floating_point():
        table, rows = table.view(torch.uint8), rows.view(torch.uint8)
    table.index_copy_(0, index, rows)


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
        self,
        depth: int,
        namespace: bytes,
        policy: LoopSlotPolicy | None = None,
        prefilling: bool = False,
    ) -> BlockTable:
        """A sequence's table; a request may bring its own policy (see `allows`). A prefilling
        table keeps every loop until `finish_prefill`."""
        return BlockTable(depth, policy or self.policy, namespace, prefilling)

    def could_hold(self, tokens: int, num_slots: int) -> bool:
        """Would `tokens` positions at `num_slots` fit in the whole (empty) pool?"""
        blocks = self.blocks_for(tokens)
        return blocks <= self.num_outer_blocks and blocks * num_slots <= self.num_rec_blocks

    def allows(self, policy: LoopSlotPolicy, depth: int) -> bool:
        """A per-request policy is safe when it needs no more slots than the server's."""
        return policy.fits_within(self.policy, depth)

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
        blocks = bundle.recurrent
        if len(blocks) != table.num_slots:  # a published per-loop bundle seen through a policy
            blocks = [blocks[t] for t in table.policy.kept_loops(table.depth)]
        for slot, block in enumerate(blocks):
            table.rec_rows[slot].extend(range(block * bs, block * bs + bs))

    def finish_prefill(self, table: BlockTable) -> None:
        """The prompt is done: from here on the table holds the policy's slots, each with the
        K/V of the last loop mapped to it (what a one-chunk prefill leaves there). Private
        bundles release the other loops' blocks; published prefix bundles keep every loop for
        later requests and are read through the policy's view."""
        if not table.prefilling:
            return
        table.prefilling = False
        slots = table.policy.num_slots(table.depth)
        if slots == table.num_slots:
            return
        keep = table.policy.kept_loops(table.depth)
        for bundle in table.bundles:
            if bundle.key is None:
                self.free_rec.extend(b for t, b in enumerate(bundle.recurrent) if t not in keep)
                bundle.recurrent = [bundle.recurrent[t] for t in keep]
        bundles = table.bundles
        table.num_slots, table.bundles, table.outer_rows = slots, [], []
        table.rec_rows, table._outer_t, table._rec_t = [[] for _ in range(slots)], None, None
        for bundle in bundles:
            self._append(table, bundle)

    # Preemption -----------------------------------------------------------------------------
    def swap_out(self, table: BlockTable, positions: int) -> SwappedKV | None:
        """Copy the K/V of a table's first `positions` positions to host memory."""
        if positions == 0:
            return None
        outer = table.outer_index()[:positions].to(self.outer_k.device)
        rec = table.rec_index()[:, :positions].to(self.rec_k.device)
        return SwappedKV(
            positions,
            table.prefilling,
            *(pool[:, outer].cpu() for pool in (self.outer_k, self.outer_v)),
            *(pool[:, rec].cpu() for pool in (self.rec_k, self.rec_v)),
        )

    def swap_in(self, table: BlockTable, kv: SwappedKV) -> None:
        """Copy swapped K/V back into a fresh table (same layout, already grown to hold them)."""
        outer = table.outer_index()[: kv.positions].to(self.outer_k.device)
        rec = table.rec_index()[:, : kv.positions].to(self.rec_k.device)
        self.outer_k[:, outer] = kv.outer_k.to(self.outer_k.device)
        self.outer_v[:, outer] = kv.outer_v.to(self.outer_k.device)
        self.rec_k[:, rec] = kv.rec_k.to(self.rec_k.device)
        self.rec_v[:, rec] = kv.rec_v.to(self.rec_k.device)

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
        self.truncate(table, 0)

    def truncate(self, table: BlockTable, tokens: int) -> None:
        """Keep only the blocks that hold the first `tokens` positions (speculative rollback
        gives back the blocks of rejected drafts); a dropped prompt block stays reusable."""
        keep = self.blocks_for(tokens)
        if len(table.bundles) <= keep:
            return
        table._outer_t = table._rec_t = None  # regrown to the same size, they would be stale
        for bundle in table.bundles[keep:]:
            bundle.refs -= 1
            if bundle.refs == 0:
                if bundle.key is not None and self.prefix.get(bundle.key) is bundle:
                    self.evictable[bundle.key] = bundle
                    self.evictable_rec += len(bundle.recurrent)
                else:
                    self._release(bundle)
        del table.bundles[keep:]
        del table.outer_rows[keep * self.block_size :]
        for rows in table.rec_rows:
            del rows[keep * self.block_size :]

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

    def publish_prefix(
        self, table: BlockTable, prompt: list[int], computed: int, loops: list[int]
    ) -> None:
        """Index the full prompt blocks whose K/V are final (prefilled exactly, every loop),
        with the loops each position ran (`loops`, per position from 0), so a hit reports the
        same usage as a cold run."""
        if not table.exact:
            return
        bs = self.block_size
        for i, key in enumerate(self._chain(table.namespace, prompt[:computed])):
            bundle = table.bundles[i]
            if bundle.key is None and key not in self.prefix:
                bundle.key, bundle.loops = key, loops[i * bs : (i + 1) * bs]
                self.prefix[key] = bundle

    def cached_loops(self, table: BlockTable, positions: int) -> list[int]:
        """Loops run per position by the prefix blocks a table attached."""
        return [n for b in table.bundles[: positions // self.block_size] for n in b.loops]

    # Early exit -----------------------------------------------------------------------------
    def fill_skipped(self, exits: list[tuple[BlockTable, Tensor, int]]) -> None:
        """Tokens that stopped early leave their last K/V in the slots of the loops they
        skipped, so later tokens read what they really wrote (copy-on-exit). `exits`: per
        sequence, (its table, the positions that exited (n,), the loop they stopped after);
        one gather and one scatter per pool for all of them."""
        src, dst = [], []
        for table, positions, exit_loop in exits:
            last = table.slot(exit_loop)
            skipped = list({table.slot(t) for t in range(exit_loop + 1, table.depth)} - {last})
            if skipped:
                rows = table.rec_index()[:, positions]  # (slots, n)
                dst.append(rows[skipped].flatten())
                src.append(rows[last].repeat(len(skipped)))
        if dst:
            to, of = torch.cat(dst), torch.cat(src)
            self.rec_k[:, to] = self.rec_k[:, of]
            self.rec_v[:, to] = self.rec_v[:, of]
