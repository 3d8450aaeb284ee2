"""The built-in model's training recipe: per-sequence depth distribution and length curriculum."""

from __future__ import annotations

from pathlib import Path

import torch

from parcae_serve.model.train import TrainSettings, sample_depths, window_shape


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
