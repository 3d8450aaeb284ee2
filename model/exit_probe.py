"""A learned per-token exit: a logistic probe on the recurrent state that predicts, after a loop,
whether further loops (up to the cap it was trained at) would still lower the token's loss.

Inputs per token after loop t (1-based), from the state before and after that loop:
  h / |h|, (h - h_prev) / |h - h_prev|   (2 d directions, d = d_rec)
  log r, r, t / mu, 1 / t                 (r = |h - h_prev| / |h|, the residual rule's signal)
so it costs one (n, 2d) x (2d,) product per loop: less than a residual test plus a matvec.
Trained post hoc (`parcae calibrate`) on a frozen checkpoint; stored as exit_probe.safetensors
beside it. Idea from learned-exit work on adaptive depth (e.g. CALM, Schuster et al. 2022,
arXiv 2207.07061, sec. 3.1; Continuous Depth Batching, arXiv 2608.09444).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from parcae_serve.model.parcae import frozen

FILE = "exit_probe.safetensors"
EXTRA = 4  # scalar features after the two directions


class ExitProbe(nn.Module):
    def __init__(self, d: int, mean_recurrence: int, epsilon: float = 0.0, cap: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * d + EXTRA, 1)
        self.mean_recurrence = mean_recurrence
        self.epsilon, self.cap = epsilon, cap  # what it was trained to predict (metadata)

    def features(self, before: Tensor, after: Tensor, ran: int) -> Tensor:
        """(n, d) states before and after loop `ran` -> (n, 2d + 4) fp32 features."""
        before, after = before.float(), after.float()
        step = after - before
        size = after.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        moved = step.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r = moved / size
        scalars = torch.cat(
            [
                r.log(),
                r,
                torch.full_like(r, ran / self.mean_recurrence),
                torch.full_like(r, 1 / ran),
            ],
            dim=-1,
        )
        return torch.cat([after / size, step / moved, scalars], dim=-1)

    def forward(self, before: Tensor, after: Tensor, ran: int) -> Tensor:
        """Probability (n,) that no further loop lowers the token's loss by more than epsilon."""
        return torch.sigmoid(self.logit(before, after, ran))

    def logit(self, before: Tensor, after: Tensor, ran: int | Tensor) -> Tensor:
        """The probe's logit (n,), as `linear(features)` but without building the features: two
        dot products and two norms per token (what decode pays per loop). `ran`: the loop just
        run, one for all rows or (n,) per row."""
        w_after, w_step, (w_log, w_r, w_ran, w_inv, bias) = frozen(
            self, "_split", (self.linear.weight, self.linear.bias), self._split
        )
        after = after.float()
        step = after - before.float()
        size = after.norm(dim=-1).clamp_min(1e-12)
        moved = step.norm(dim=-1).clamp_min(1e-12)
        r = moved / size
        constant = bias + w_ran * (ran / self.mean_recurrence) + w_inv / ran
        # in-place, scaled adds: this runs after every loop, and on a decode batch each op costs
        # its dispatch more than its arithmetic (bench/exit_overhead.py: 5.3% -> 4.8% of a loop)
        out = (after @ w_after).div_(size).addcdiv_(step @ w_step, moved)
        return out.add_(r.log(), alpha=w_log).add_(r, alpha=w_r).add_(constant)

    def _split(self) -> tuple:
        """The weight split by feature: the two direction vectors, the scalars as floats."""
        d = (self.linear.in_features - EXTRA) // 2
        w = self.linear.weight.detach()[0]
        return w[:d].clone(), w[d : 2 * d].clone(), [*w[2 * d :].tolist(), self.linear.bias.item()]

    def exits(
        self, before: Tensor, after: Tensor, ran: int | Tensor, threshold: float | Tensor
    ) -> Tensor:
        """(n,) bool: probability >= threshold (one, or (n,) per row), compared as logits."""
        cut = torch.logit(threshold.float()) if isinstance(threshold, Tensor) else logit(threshold)
        return self.logit(before, after, ran) >= cut  # q = 0: always; q = 1: never

    def save(self, directory: Path) -> None:
        meta = {"mean_recurrence": str(self.mean_recurrence), "epsilon": str(self.epsilon),
                "cap": str(self.cap), "d": str((self.linear.in_features - EXTRA) // 2)}  # fmt: skip
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / FILE), metadata=meta)


def logit(q: float) -> float:
    """log(q / (1 - q)) in Python (one threshold for a batch needs no tensor ops): -inf at
    q <= 0, inf at q >= 1, as torch.logit."""
    if q <= 0:
        return -math.inf
    return math.inf if q >= 1 else math.log(q / (1 - q))


def load_exit_probe(
    directory: Path, device: torch.device | str = "cpu", d_rec: int | None = None
) -> ExitProbe | None:
    """The probe beside a checkpoint, or None if it has none; ValueError if it was trained for a
    state of another width than `d_rec`."""
    path = Path(directory) / FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    probe = ExitProbe(int(meta["d"]), int(meta["mean_recurrence"]), float(meta["epsilon"]),
                      int(meta["cap"]))  # fmt: skip
    if d_rec is not None and int(meta["d"]) != d_rec:
        raise ValueError(f"{path} is for states of width {meta['d']}, the model's are {d_rec}")
    probe.load_state_dict(load_file(str(path)))
    return probe.to(device).eval()
