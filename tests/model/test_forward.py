"""The optimised forward against the plain reference (tests/model/reference.py)."""

import pytest
import torch

from parcae_serve.model.config import ParcaeConfig
from parcae_serve.model.parcae import Parcae
from tests.helpers import CONFIGS, random_model, reference_cfg
from tests.model.reference import reference_forward


def _state(model: Parcae, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("depth", [1, 3, 9])
def test_forward_matches_reference_float32(name: str, depth: int) -> None:
    cfg = CONFIGS[name]
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(depth))
    logits = model(ids, depth, torch.Generator().manual_seed(7))
    # the model draws row 0 then row 1 from one generator; redraw them the same way
    g = torch.Generator().manual_seed(7)
    h0 = torch.cat([model.initial_state(1, 11, [g], logits) for _ in range(2)])
    for row in range(2):
        ref = reference_forward(
            _state(model, torch.float32), reference_cfg(cfg), ids[row], depth, h0[row]
        )
        diff = (logits[row].log_softmax(-1) - ref.log_softmax(-1)).abs().max().item()
        assert diff < 1e-4, f"max |dlogprob| {diff}"


def test_forward_matches_reference_float64_tightly() -> None:
    cfg = CONFIGS["gqa-linear-gated-silu-wide-core"]
    model = random_model(cfg, dtype=torch.float64)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    logits = model(ids, 4, torch.Generator().manual_seed(3))
    h0 = model.initial_state(1, 9, [torch.Generator().manual_seed(3)], logits).double()
    ref = reference_forward(_state(model, torch.float64), reference_cfg(cfg), ids[0], 4, h0[0])
    assert (logits[0].double().log_softmax(-1) - ref.log_softmax(-1)).abs().max() < 1e-4


def test_bfloat16_forward_tracks_float32() -> None:
    cfg = CONFIGS["mha-diagonal-relu2-ve"]
    model = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    ref = model(ids, 4, torch.Generator().manual_seed(1)).log_softmax(-1)
    low = model.to(torch.bfloat16)(ids, 4, torch.Generator().manual_seed(1)).log_softmax(-1)
    assert low.dtype == torch.float32  # logits are always fp32
    assert (low - ref).abs().mean() < 0.05


def test_depth_changes_output_and_far_depths_run() -> None:
    model = random_model(CONFIGS["mha-diagonal-relu2-ve"])
    ids = torch.randint(0, 100, (1, 8))
    a = model(ids, 2, torch.Generator().manual_seed(0))
    b = model(ids, 3, torch.Generator().manual_seed(0))
    far = model(ids, 200, torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)
    assert torch.isfinite(far).all()


def test_seeded_initial_state_is_reproducible_and_seed_dependent() -> None:
    model = random_model(CONFIGS["mha-diagonal-relu2-ve"])
    ids = torch.randint(0, 100, (1, 8))
    first = model(ids, 3, torch.Generator().manual_seed(5))
    again = model(ids, 3, torch.Generator().manual_seed(5))
    other = model(ids, 3, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("kind", ["like-init", "zero", "normal", "embed", "unit"])
def test_every_state_init_draws_the_documented_distribution(kind: str) -> None:
    model = Parcae(ParcaeConfig(n_embd=256, num_attention_heads=4, state_init=kind))
    h = model.initial_state(1, 64, [torch.Generator().manual_seed(0)], torch.zeros(1))
    std = {
        "like-init": (2 / (5 * 256)) ** 0.5,
        "zero": 0.0,
        "normal": 1.0,
        "embed": 1 / 16,
        "unit": 1.0,
    }
    assert h.shape == (1, 64, 256)
    assert abs(h.std().item() - std[kind]) < 0.1 * max(std[kind], 1e-3) + 1e-6
    if kind == "like-init":
        assert h.abs().max() <= 3 * std[kind] + 1e-6  # truncated at 3 std


def test_diagonal_injection_is_contractive_for_random_parameters() -> None:
    """Every entry of exp(-softplus(dt_bias) * exp(A_log)) lies strictly in (0, 1). Parameters are
    drawn over [-4, 4] (float64), where the true value is representable rather than rounded."""
    g = torch.Generator().manual_seed(0)
    adapter = Parcae(ParcaeConfig(n_embd=32, num_attention_heads=2)).transformer["adapter"].double()
    for _ in range(500):
        with torch.no_grad():
            adapter.A_log.uniform_(-4, 4, generator=g)
            adapter.dt_bias.uniform_(-4, 4, generator=g)
        decay = adapter.decay()
        assert ((decay > 0) & (decay < 1)).all()


@pytest.mark.parametrize("kind", ["like-init", "normal"])
def test_seeded_states_draw_what_one_row_at_a_time_draws(kind: str) -> None:
    """The engine's burst of h_0 rows (one seed each) equals drawing them one by one, including
    rows whose truncated draw was redrawn (about a third of rows at this width)."""
    model = Parcae(ParcaeConfig(n_embd=128, num_attention_heads=4, state_init=kind))
    seeds, g = list(range(40)), torch.Generator()
    rows = []
    for seed in seeds:
        g.manual_seed(seed)
        rows.append(model.initial_state(1, 1, [g], torch.zeros(1))[0])
    assert torch.equal(model.seeded_states(seeds, g, torch.zeros(1)), torch.cat(rows))
