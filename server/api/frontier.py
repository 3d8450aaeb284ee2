"""The measured compute-quality frontier of a checkpoint, and the `auto` exit that picks from it.

`parcae calibrate` measures held-out NLL and decode tokens/s for every fixed depth and every exit
rule (calibration.json). The Pareto front of those points (no other point has lower NLL and more
tokens/s) is published in /v1/models; `recurrence_exit: {"criterion": "auto", "max_nll_cost": c}`
runs the fastest point whose NLL is within `c` (relative: 0.01 = 1%) of the best measured NLL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class FrontierPoint:
    depth: int  # the depth, or the cap of an exit rule
    criterion: str | None  # None: fixed depth
    threshold: float | None
    nll: float
    mean_depth: float
    tokens_per_s: float

    def public(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Frontier:
    points: tuple[FrontierPoint, ...]  # the Pareto front, by NLL
    measured: tuple[FrontierPoint, ...] = ()  # every point (the front within a depth limit)

    @classmethod
    def from_calibration(cls, calibration: dict | None, has_probe: bool) -> Frontier | None:
        """The front of a calibration.json's points (learned-exit points only if the probe they
        were measured with is there)."""
        if not calibration or "tokens_per_s_by_depth" not in calibration:
            return None
        speed = calibration["tokens_per_s_by_depth"]
        points = [FrontierPoint(int(d), None, None, nll, float(d), speed[d])
                  for d, nll in calibration["loss_by_depth"].items() if d in speed]  # fmt: skip
        fields = ("depth", "criterion", "threshold", "nll", "mean_depth", "tokens_per_s")
        points += [FrontierPoint(*(r[f] for f in fields)) for r in calibration.get("adaptive", [])
                   if all(f in r for f in fields)
                   and (has_probe or r["criterion"] != "learned")]  # fmt: skip
        if not points:
            return None
        return cls(tuple(pareto(points)), tuple(points))

    def cheapest(self, max_nll_cost: float, max_depth: int) -> FrontierPoint | None:
        """The fastest point within `max_nll_cost` of the best NLL among the points within
        --max-depth (None if no measured point is)."""
        usable = [p for p in self.measured or self.points if p.depth <= max_depth]
        if not usable:
            return None
        best = min(p.nll for p in usable)
        ok = [p for p in usable if p.nll <= best * (1 + max_nll_cost)]
        return max(ok, key=lambda p: p.tokens_per_s)


def pareto(points: list[T], cost: Callable[[T], tuple[float, float]] | None = None) -> list[T]:
    """The points no other point beats on both NLL (lower) and tokens/s (higher), by NLL.
    `cost(point)` -> (nll, tokens_per_s); default: the point's own attributes."""
    cost = cost or (lambda p: (p.nll, p.tokens_per_s))
    scored = [(cost(p), p) for p in points]

    def beaten(nll: float, speed: float) -> bool:
        return any(q_nll <= nll and q_speed >= speed and (q_nll < nll or q_speed > speed)
                   for (q_nll, q_speed), _ in scored)  # fmt: skip

    return [
        p for (nll, speed), p in sorted(scored, key=lambda s: s[0][0]) if not beaten(nll, speed)
    ]
