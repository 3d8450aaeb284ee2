"""The teacher-forced evaluator behind `parcae calibrate` and bench/frontier.py schedules decode
as the engine does (continuous depth batching): streams leave and refill the loop batch on
their own, and the scheduling changes no token's loss or loops."""

from __future__ import annotations

import pytest
import torch

from parcae_serve.server.calibration.evaluation import teacher_forced_nll
from parcae_serve.server.engine.runner import ModelRunner
from parcae_serve.server.engine.sequence import RecurrenceExit
from tests.helpers import random_model
from tests.server.test_engine import NOISY, ZERO_INIT

RULE = RecurrenceExit("residual", 0.2)  # on these random models: tokens exit after 2..8 loops


def windows(vocab: int, n: int = 3, length: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize(
    ("cfg", "wait"),
    [(ZERO_INIT, 0), (NOISY, 0), (NOISY, 2), (NOISY, None)],
    ids=["zero-init", "noisy", "noisy-wait-2", "noisy-lockstep"],
)
def test_batched_streams_score_every_token_as_each_stream_alone(cfg, wait) -> None:
    model, data = random_model(cfg), windows(cfg.vocab_size)
    together = teacher_forced_nll(model, data, 8, exit=RULE, per_token=True, coda_wait=wait)
    alone = [
        teacher_forced_nll(model, [s], 8, exit=RULE, seed=i, per_token=True)
        for i, s in enumerate(data)
    ]
    # per_token is position-major: token p of stream s at p * streams + s
    by_stream = torch.tensor(together.token_nll).view(-1, len(data)).T
    for s, quality in enumerate(alone):
        assert torch.allclose(by_stream[s], torch.tensor(quality.token_nll), atol=1e-4)
    assert together.mean_depth == pytest.approx(sum(q.mean_depth for q in alone) / len(alone))
    assert 2 < together.mean_depth < 7  # the rule did exit tokens at different loops


def test_a_stream_whose_token_exits_starts_its_next_token_without_waiting(monkeypatch) -> None:
    """With no coda wait, one loop call may run tokens of different positions: a fast stream
    moved on while a slow one still loops (lockstep steps only ever run one position a loop)."""
    positions_per_loop: list[set[int]] = []
    loop = ModelRunner.loop

    def spy(self, groups):
        positions_per_loop.append({int(g.positions[0]) for g in groups})
        return loop(self, groups)

    model, data = random_model(ZERO_INIT), windows(ZERO_INIT.vocab_size)
    loops_alone = [teacher_forced_nll(model, [s], 8, exit=RULE).mean_depth * 11 for s in data]
    monkeypatch.setattr(ModelRunner, "loop", spy)
    teacher_forced_nll(model, data, 8, exit=RULE, coda_wait=0)
    assert any(len(p) > 1 for p in positions_per_loop)
    # each stream loops without a gap, so the batch runs as many loops as its busiest stream
    # needs alone (in lockstep: per position, the slowest stream's loops, summed)
    assert len(positions_per_loop) == round(max(loops_alone))


def test_fixed_depth_runs_in_lockstep() -> None:
    model, data = random_model(ZERO_INIT), windows(ZERO_INIT.vocab_size)
    quality = teacher_forced_nll(model, data, 4, per_token=True)
    assert quality.mean_depth == 4 and len(quality.token_nll) == 11 * 3


def test_waiting_for_the_coda_batches_it(monkeypatch) -> None:
    """Done tokens that wait share coda passes: fewer of them the longer they may wait, one
    per position in lockstep."""
    calls: list[int] = []
    coda = ModelRunner.coda

    def spy(self, groups):
        calls.append(len(groups))
        return coda(self, groups)

    monkeypatch.setattr(ModelRunner, "coda", spy)
    model, data = random_model(ZERO_INIT), windows(ZERO_INIT.vocab_size, n=6)
    passes = {}
    for wait in (0, 2, None):
        calls.clear()
        teacher_forced_nll(model, data, 8, exit=RULE, coda_wait=wait)
        assert sum(calls) == 6 * 11  # every token once
        passes[wait] = len(calls)
    assert passes[0] > passes[2] >= passes[None] == 11
