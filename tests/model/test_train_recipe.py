"""The built-in model's training recipe: per-sequence depth distribution and length curriculum."""

from __future__ import annotations

from pathlib import Path

import torch

from parcae_serve.model.parcae import CausalContext, Parcae
from parcae_serve.model.train import (
    TrainSettings,
    forward_per_sequence,
    init_weights,
    model_config,
    sample_depths,
    settle_penalty,
    window_shape,
)


def test_depths_are_per_sequence_within_bounds_with_a_deep_tail() -> None:
    g = torch.Generator().manual_seed(0)
    depths = torch.tensor(sample_depths(6, 0.5, 24, 0.2, 20_000, g))
    assert depths.min() >= 1 and depths.max() <= 24
    deep = (depths >= 12).float().mean().item()
    # the uniform tail alone puts 0.2 * 13/19 of the mass at >= 12; the log-normal body adds a bit
    assert 0.14 < deep < 0.22
    assert (depths == 24).any()
    assert 5.5 < depths.float().mean().item() < 9.0


def test_no_tail_is_the_log_normal_poisson_alone() -> None:
    g = torch.Generator().manual_seed(0)
    depths = torch.tensor(sample_depths(6, 0.5, 24, 0.0, 20_000, g))
    assert abs(depths.float().mean().item() - 6) < 0.2
    assert (depths >= 18).float().mean().item() < 0.02


def test_curriculum_trains_short_windows_first_and_the_served_length_last() -> None:
    s = TrainSettings(out=Path("unused"), seq=1024, batch=4, short_seq=256, short_batch=16,
                      long_fraction=0.2)  # fmt: skip
    assert window_shape(s, 0.0) == (256, 16)
    assert window_shape(s, 0.79) == (256, 16)
    assert window_shape(s, 0.8) == (1024, 4)
    assert window_shape(s, 1.0) == (1024, 4)
    s.long_fraction = 1.0  # no curriculum: the served length throughout
    assert window_shape(s, 0.0) == (1024, 4)


def test_settle_penalty_is_the_last_loop_change_of_rows_at_least_mu_deep() -> None:
    s = TrainSettings(out=Path("unused"), d=32, heads=2, vocab=64, mu_rec=3)
    model = Parcae(model_config(s, 64))
    init_weights(model, 0)
    with torch.no_grad():  # the init zeroes the output projections: make the blocks do work
        for name, p in model.named_parameters():
            if name.endswith(("c_proj.weight", "mlp.proj.weight")):
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    depths = [2, 5, 3]
    g = torch.Generator().manual_seed(2)
    logits, order, change = forward_per_sequence(model, ids, depths, g, backprop=2)
    assert order.tolist() == [1, 2, 0] and logits.shape == (3, 8, 64)
    # the same rows looped one at a time from the same h_0 (drawn for the sorted batch):
    # change = |h_T - h_{T-1}|^2 / |h_T|^2, mean over positions
    sorted_ids = ids[order]
    h0 = model.initial_state(3, 8, [torch.Generator().manual_seed(2)] * 3, sorted_ids.float())
    for i, depth in enumerate([5, 3, 2]):
        states = hidden_states(model, sorted_ids[i : i + 1], h0[i : i + 1], depth)
        h_prev, h_last = states[-2], states[-1]
        want = ((h_last - h_prev).square().sum(-1) / h_last.square().sum(-1)).mean()
        assert torch.allclose(change[i], want, rtol=1e-4)
    penalty = settle_penalty(change, torch.tensor(depths)[order], s)
    assert torch.allclose(penalty, change[:2].mean())  # depths 5 and 3 are >= mu, 2 is not
    penalty.backward()  # the penalty trains the recurrence
    core = model.transformer["core_block"][0].attn.c_proj.weight
    assert core.grad is not None and core.grad.abs().sum() > 0
    assert settle_penalty(change, torch.tensor([1, 1, 2]), s).item() == 0


def hidden_states(model: Parcae, ids: torch.Tensor, h0: torch.Tensor, depth: int) -> list:
    """h_0 .. h_depth of a plain whole-sequence forward (the reference for the training path)."""
    L = ids.shape[1]
    rots, ctx = model.rotations(torch.arange(L).expand(1, L)), CausalContext()
    with torch.no_grad():
        e = model.prelude(ids, rots, ctx)
        prepared = model.transformer["adapter"].prepare(e)
        states = [h0]
        for t in range(depth):
            states.append(model.core(states[-1], prepared, ids, rots, ctx, t))
    return states
