"""The paper's L(T) = L_inf + Z exp(-z T) fit recovers known parameters."""

import math

import pytest

from parcae_serve.model.depth_curve import fit_saturating_law, predict


@pytest.mark.parametrize(("L_inf", "Z", "z"), [(3.1, 0.9, 0.7), (4.0, 0.2, 0.15), (2.5, 2.0, 1.5)])
def test_fit_recovers_the_law(L_inf: float, Z: float, z: float) -> None:
    depths = [1, 2, 3, 4, 6, 8, 12, 16, 24]
    losses = [L_inf + Z * math.exp(-z * t) for t in depths]
    fit = fit_saturating_law(depths, losses)
    assert fit["L_inf"] == pytest.approx(L_inf, abs=0.01)
    assert fit["Z"] == pytest.approx(Z, rel=0.05)
    assert fit["z"] == pytest.approx(z, rel=0.05)
    assert predict(fit, 5) == pytest.approx(L_inf + Z * math.exp(-z * 5), abs=0.01)
