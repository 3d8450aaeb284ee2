"""Block pool accounting, prefix reuse and LRU eviction, without a model."""

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.server.engine.kv_cache import KVCache, LoopSlotPolicy

CFG = ParcaeConfig(n_embd=32, num_attention_heads=2, vocab_size=64)


def pool(bundles: int, policy: str = "shared:1", depth: int = 4) -> KVCache:
    probe = KVCache(CFG, LoopSlotPolicy.parse(policy), 0, typical_depth=depth, block_size=4)
    budget = bundles * probe.bundle_bytes(probe.policy.num_slots(depth))
    return KVCache(CFG, probe.policy, budget, typical_depth=depth, block_size=4)


def test_bytes_are_accounted_exactly_and_return_to_zero() -> None:
    cache = pool(8)
    table = cache.new_table(4, b"ns")
    assert cache.ensure(table, 9)  # 3 blocks of 4
    assert cache.used_bytes == 3 * cache.bundle_bytes(1) == 12 * cache.token_bytes(4)
    assert not cache.ensure(cache.new_table(4, b"ns"), 6 * 4)  # 6 more blocks do not fit in 5
    cache.free(table)
    assert cache.used_bytes == 0


def test_prefix_blocks_are_reused_then_evicted_least_recently_used_first() -> None:
    cache = pool(4, "per-loop")  # published prefix blocks keep every loop's K/V
    prompt = list(range(13))  # 3 full blocks (the last token is never reused)
    first = cache.new_table(4, b"ns")
    assert cache.ensure(first, len(prompt))
    cache.publish_prefix(first, prompt, len(prompt), [4] * len(prompt))
    cache.free(first)
    assert cache.used_bytes == 0 and len(cache.evictable) == 3

    again = cache.new_table(4, b"ns")
    assert cache.attach_prefix(again, prompt) == 12
    other_namespace = cache.new_table(4, b"other")
    assert cache.attach_prefix(other_namespace, prompt) == 0  # another depth/seed/exit: no reuse
    cache.free(again)

    big = cache.new_table(4, b"ns")
    assert cache.ensure(big, 16)  # needs every block: evicts all cached prefixes
    assert not cache.prefix and not cache.evictable
    cache.free(big)
    assert cache.used_bytes == 0
    assert cache.attach_prefix(cache.new_table(4, b"ns"), prompt) == 0


def test_shared_one_admits_as_many_deep_as_shallow_sequences() -> None:
    for policy, same in (("shared:1", True), ("per-loop", False)):
        counts = []
        for depth in (2, 32):
            cache = pool(64, policy, depth=4)
            n = 0
            while cache.ensure(cache.new_table(depth, b""), 32):
                n += 1
            counts.append(n)
        assert (counts[0] == counts[1]) is same, (policy, counts)
