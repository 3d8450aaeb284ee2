"""The CPU decode-attention kernel against plain softmax attention, and inside the decode graph."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.server.engine import cpu_kernels
from parcae_serve.server.engine.decode_graph import CompiledDecoder, DecodeBatch, PoolReadAttention
from parcae_serve.server.engine.kv_cache import PER_LOOP, KVCache
from tests.helpers import random_model

CFG = ParcaeConfig(n_embd=32, num_attention_heads=2, vocab_size=64, mean_recurrence=2)


def reference(q, k_self, v_self, pool_k, pool_v, rows, lengths):
    """Per row, in float64: softmax attention over its first `lengths[b]` pool rows and its
    own K/V, query head h reading K/V head h // G."""
    B, H, D = q.shape
    G = H // k_self.shape[1]
    outs = []
    for b in range(B):
        n = int(lengths[b])
        keys = torch.cat([pool_k[rows[b, :n]], k_self[b : b + 1]]).double()  # (n+1, Hkv, D)
        values = torch.cat([pool_v[rows[b, :n]], v_self[b : b + 1]]).double()
        keys, values = keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1)
        weights = torch.einsum("hd,lhd->hl", q[b].double(), keys).mul(D**-0.5).softmax(-1)
        outs.append(torch.einsum("hl,lhd->hd", weights, values).float())
    return torch.stack(outs)


def inputs(B: int, H: int, Hkv: int, D: int, L: int, lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    R = 4 * L + 8
    pool_k, pool_v = (torch.randn(R, Hkv, D, generator=gen) for _ in range(2))
    rows = torch.stack([torch.randperm(R, generator=gen)[:L] for _ in range(B)])
    # columns past a row's length point far outside the pool: read, they would raise
    past = torch.arange(L)[None, :] >= torch.tensor(lengths).clamp(0, L)[:, None]
    rows += 10**9 * past
    q = torch.randn(B, H, D, generator=gen)
    k_self, v_self = (torch.randn(B, Hkv, D, generator=gen) for _ in range(2))
    return q, k_self, v_self, pool_k, pool_v, rows, torch.tensor(lengths)


@pytest.fixture(autouse=True, scope="module")
def kernel() -> None:
    # CI has the compiler torch.compile needs; without it the engine falls back (with a
    # warning), and these tests must say so rather than pass on the torch path
    assert cpu_kernels.available()


def test_decoder_uses_the_kernel_over_every_pool_dtype() -> None:
    model = random_model(CFG)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        cache = KVCache(CFG, PER_LOOP, 2**20, typical_depth=2, dtype=dtype)
        assert CompiledDecoder(model, cache, "eager").fused


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "D", "L", "lengths"),
    [
        (1, 4, 4, 64, 900, [900]),  # the built-in model's heads, long context
        (3, 8, 2, 24, 300, [0, 127, 300]),  # GQA, a head size that is no vector multiple
        (4, 4, 2, 16, 260, [128, 129, 255, 256]),  # around the kernel's chunk boundaries
        (2, 2, 1, 32, 5, [1, 5]),
        (2, 4, 2, 20, 12, [-3, 40]),  # lengths outside [0, L] clamp; 20: no AVX2 multiple
    ],
)
def test_kernel_matches_softmax_attention(B, H, Hkv, D, L, lengths) -> None:
    args = inputs(B, H, Hkv, D, L, lengths)
    got = cpu_kernels.decode_attention(*args, D**-0.5)
    q, k_self, v_self, pool_k, pool_v, rows, lengths = args
    want = reference(q, k_self, v_self, pool_k, pool_v, rows, lengths.clamp(0, L))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_kernel_reads_narrow_pools(dtype) -> None:
    """K/V stored in half precision or fp8 (--kv-cache-dtype): read as stored, computed in
    fp32."""
    for D in (24, 64, 80):  # vector tails, the register-tiled loop (AVX2 and AVX-512), both
        q, *kv, rows, lengths = inputs(3, 8, 2, D, 300, [0, 130, 300])
        kv = [t.to(dtype) for t in kv]
        got = cpu_kernels.decode_attention(q, *kv, rows, lengths, D**-0.5)
        assert got.dtype == torch.float32
        want = reference(q, *(t.float() for t in kv), rows, lengths)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="dtype"):  # own K/V not rounded as the pool stores
        cpu_kernels.decode_attention(q, kv[0].float(), *kv[1:], rows, lengths, 1)


# 16, 32, 64: the output tiles of two, four and eight vectors (AVX2); 20: a scalar tail
@pytest.mark.parametrize("D", [16, 20, 32, 64])
def test_kernel_reads_every_fp8_value_as_torch_does(D: int) -> None:
    """Row b's one past position holds fp8 byte b (every byte but the two NaNs) in all of its
    V, and its keys put all the weight there (its own score is 64 below): the output is that
    V read back exactly, subnormals, zeros and +-448 included."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    B = len(codes)
    pool_v = codes[:, None, None].expand(B, 1, D).contiguous().view(torch.float8_e4m3fn)
    pool_k = torch.full((B, 1, D), 2.0).to(torch.float8_e4m3fn)
    q = torch.ones(B, 1, D)
    k_self = (-pool_k[:B].float()).to(torch.float8_e4m3fn)
    v_self = torch.zeros(B, 1, D).to(torch.float8_e4m3fn)
    rows, lengths = torch.arange(B)[:, None], torch.ones(B, dtype=torch.long)
    scale = 16 / D  # scores +-32
    got = cpu_kernels.decode_attention(q, k_self, v_self, pool_k, pool_v, rows, lengths, scale)
    assert torch.equal(got, pool_v.float())
    assert got.abs().max() == 448 and (got[:, 0, 0] == 0).sum() == 2  # +0 and -0


def test_kernel_rejects_bad_input() -> None:
    q, k_self, v_self, pool_k, pool_v, rows, lengths = inputs(2, 4, 4, 16, 300, [300, 300])
    bad = rows.clone()
    bad[1, 200] = len(pool_k)  # in the second chunk of the second row: raised in a worker
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.decode_attention(q, k_self, v_self, pool_k, pool_v, bad, lengths, 0.25)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernels.decode_attention(q.double(), k_self, v_self, pool_k, pool_v, rows, lengths, 1)
    with pytest.raises(RuntimeError, match="head shapes"):
        cpu_kernels.decode_attention(q[:, :3], k_self, v_self, pool_k, pool_v, rows, lengths, 1)


def test_graph_attention_same_with_and_without_kernel() -> None:
    """PoolReadAttention's two paths on one paged batch: recurrent slot lookup, padding columns
    past each row's length, and the row's own K/V."""
    gen = torch.Generator().manual_seed(1)
    B, H, Hkv, D, L, R = 3, 4, 2, 16, 40, 200
    pools = tuple(torch.randn(2, R, Hkv, D, generator=gen) for _ in range(4))
    rows = torch.randint(0, R, (2, B, L), generator=gen)
    lengths = torch.tensor([40, 17, 0])
    batch = DecodeBatch(
        torch.zeros(B, 1, dtype=torch.long), lengths[:, None], torch.zeros(B, 1, 8), lengths,
        rows[0], rows, torch.tensor([1, 0]),
    )  # fmt: skip
    q = torch.randn(B, H, 1, D, generator=gen)
    k, v = (torch.randn(B, Hkv, 1, D, generator=gen) for _ in range(2))
    for key in (("prelude", 1), ("core_block", 0, 0), ("core_block", 1, 1)):
        plain = PoolReadAttention(pools, batch, 1).attend(key, q, k, v)
        fused = PoolReadAttention(pools, batch, 1, fused=True).attend(key, q, k, v)
        assert fused.shape == plain.shape
        assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("env", [{"CXX": "false"}, {"PARCAE_CPU_KERNELS": "0"}])
def test_kernel_unavailable_without_compiler_or_when_switched_off(tmp_path, env) -> None:
    """A failed build (no working compiler) or the switch leaves `available()` False (so
    `fused_attention_fits` keeps the decode graphs on torch's attention), with a warning, not
    an error, and nothing in the cache."""
    code = (
        "from parcae_serve.server.engine import cpu_kernels\n"
        "print(cpu_kernels.available(), list(cpu_kernels.cache_dir().glob('*.so')))\n"
    )
    full_env = {**os.environ, "PARCAE_KERNEL_CACHE": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "[]"]  # the lock file may stay, no library
    if "CXX" in env:
        assert "using the torch path" in done.stderr
