"""The paper's saturating law for loss against test-time depth: L(T) = L_inf + Z * exp(-z T)."""

from __future__ import annotations

import math

import torch


def fit_saturating_law(depths: list[int], losses: list[float]) -> dict[str, float]:
    """Least-squares fit. For each rate z on a log grid, L_inf and Z are linear: solve them in
    closed form and keep the z with the smallest residual (no optimiser dependency needed)."""
    T = torch.tensor(depths, dtype=torch.float64)
    L = torch.tensor(losses, dtype=torch.float64)
    best: dict[str, float] = {}
    for z in torch.logspace(-3, 1.5, 400, dtype=torch.float64).tolist():
        X = torch.stack([torch.ones_like(T), torch.exp(-z * T)], dim=1)
        coef = torch.linalg.lstsq(X, L.unsqueeze(1)).solution.squeeze(1)
        rss = float(((X @ coef - L) ** 2).sum())
        if not best or rss < best["rss"]:
            best = {"L_inf": float(coef[0]), "Z": float(coef[1]), "z": z, "rss": rss}
    return {k: round(v, 6) for k, v in best.items()}


def predict(fit: dict[str, float], depth: int) -> float:
    return fit["L_inf"] + fit["Z"] * math.exp(-fit["z"] * depth)
