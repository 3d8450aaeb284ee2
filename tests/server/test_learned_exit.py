"""The learned exit: labels and oracle on known losses, and the probe's round trip
calibrate -> checkpoint directory -> server (requests with criterion "learned")."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from parcae_serve.model.exit_probe import FILE, ExitProbe, load_exit_probe
from parcae_serve.server.api.frontier import Frontier
from parcae_serve.server.calibration.calibrate import calibrate
from parcae_serve.server.calibration.learned_exit import (
    LoopTrace,
    distribution_oracle,
    done_labels,
    oracle,
    oracle_at_nll,
    trace_loops,
)
from tests.conftest import running_server


def test_labels_and_oracle_on_known_losses() -> None:
    # three tokens, cap 4: one done after loop 1, one improving until loop 3, one whose loss
    # rises after loop 2 (more loops hurt)
    nll = torch.tensor([[1.0, 3.0, 2.0], [1.0, 2.0, 1.0], [1.0, 1.0, 1.5], [1.0, 1.0, 1.6]])
    labels = done_labels(nll, epsilon=0.01)
    assert labels[:, 0].tolist() == [True, True, True, True]
    assert labels[:, 1].tolist() == [False, False, True, True]
    assert labels[:, 2].tolist() == [False, True, True, True]
    got = oracle(LoopTrace(torch.zeros(5, 3, 2), nll), epsilon=0.01)
    # within eps of the cap's loss: token 0 at loop 1, token 1 at loop 3, token 2 at loop 2
    # (1.0 <= 1.6): mean depth 2, losses 1.0, 1.0, 1.0
    assert got["mean_depth"] == pytest.approx(2.0) and got["nll"] == pytest.approx(1.0)
    assert got["nll_at_cap"] == pytest.approx((1.0 + 1.0 + 1.6) / 3)


def test_budgeted_oracle_buys_loops_where_they_lower_the_loss_most() -> None:
    # cap 3; token 0 gains 1.0 from loop 2, token 1 gains 0.1 from loop 3, token 2 nothing
    nll = torch.tensor([[2.0, 1.2, 1.0], [1.0, 1.2, 1.0], [1.0, 1.1, 1.0]])
    got = oracle_at_nll(nll, target=(1.0 + 1.2 + 1.0) / 3)  # only token 0's loop is needed
    assert got["mean_depth"] == pytest.approx(4 / 3)
    assert got["nll"] <= got["target"] + 1e-6
    full = oracle_at_nll(nll, target=3.1 / 3)  # token 1 needs loop 3 too
    assert full["mean_depth"] == pytest.approx(6 / 3) and full["nll"] == pytest.approx(3.1 / 3)
    assert oracle_at_nll(nll, target=1.0)["mean_depth"] is None  # unreachable at any depth


def test_distribution_oracle_reads_the_kl_not_the_label() -> None:
    nll = torch.tensor([[0.1, 3.0], [2.0, 2.0], [2.0, 1.0]])  # token 0 scores best at loop 1
    kl = torch.tensor([[0.5, 0.002], [0.001, 0.0], [0.0, 0.0]])  # ...but its distribution moves
    got = distribution_oracle(LoopTrace(torch.zeros(4, 2, 2), nll, kl), epsilon=0.01)
    assert got["mean_depth"] == pytest.approx(1.5)  # token 0 at loop 2, token 1 at loop 1
    assert got["nll"] == pytest.approx((2.0 + 3.0) / 2)
    assert oracle(LoopTrace(torch.zeros(4, 2, 2), nll), 0.01)["nll"] < got["nll"]


def test_trace_records_the_kl_to_the_cap(tiny_model_dir: Path) -> None:
    from parcae_serve.model.loading import load_checkpoint

    model = load_checkpoint(tiny_model_dir)
    trace = trace_loops(model, [[0, 5, 9, 3, 7, 2, 11, 4]], cap=4)
    assert trace.kl is not None and trace.kl.shape == trace.nll.shape == (4, 7)
    assert bool((trace.kl[:-1] >= -1e-6).all()) and float(trace.kl[-1].abs().max()) < 1e-6
    loose = distribution_oracle(trace, epsilon=float("inf"))
    assert loose["mean_depth"] == 1 and loose["nll"] == pytest.approx(float(trace.nll[0].mean()))
    assert distribution_oracle(trace, epsilon=-1.0)["mean_depth"] == 4  # only the cap itself


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("calibrated") / "tiny"
    shutil.copytree(tiny_model_dir, directory)
    report = calibrate(str(directory), sequences=2, length=12, log=lambda *_: None)
    return directory, report


def test_calibrate_writes_the_probe_and_the_oracle(calibrated) -> None:
    directory, report = calibrated
    assert (directory / FILE).exists()
    learned = [r for r in report["adaptive"] if r["criterion"] == "learned"]
    assert len(learned) >= 5 and all(1 <= r["mean_depth"] <= r["depth"] for r in learned)
    depths = [r["mean_depth"] for r in learned]  # a higher threshold never exits earlier
    assert depths == sorted(depths)
    assert 1 <= report["oracle"]["mean_depth"] <= report["oracle"]["cap"]
    blind = report["distribution_oracle"]  # the same trace, read without the label
    assert blind["nll_at_cap"] == pytest.approx(report["oracle"]["nll_at_cap"])
    assert 1 <= blind["mean_depth"] <= blind["cap"] == report["oracle"]["cap"]
    assert 0 <= report["exit_probe"]["accuracy"] <= 1
    probe = load_exit_probe(directory)
    before, after = torch.randn(5, 64), torch.randn(5, 64)
    p = probe(before, after, 2)
    assert p.shape == (5,) and bool(((p > 0) & (p < 1)).all())


def test_the_server_exits_on_the_probe(calibrated, tiny_model_dir: Path) -> None:
    directory, _ = calibrated
    body = {"prompt": "import os\n", "max_tokens": 6, "recurrence_depth": 6, "temperature": 0}

    def depth(url: str, threshold: float, min_depth: int = 1) -> float:
        rule = {"criterion": "learned", "threshold": threshold, "min_depth": min_depth}
        r = httpx.post(f"{url}/v1/completions", json={**body, "recurrence_exit": rule}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["recurrence"]["mean_depth"]

    with running_server(directory, "--kv-policy", "per-loop") as server:
        assert depth(server.url, 0.0, min_depth=2) == 2.0  # p >= 0 always: exit at min_depth
        assert depth(server.url, 1.0) == 6.0  # p < 1 always: never exit
        rule = {"criterion": "learned", "threshold": 1.5}
        r = httpx.post(f"{server.url}/v1/completions", json={**body, "recurrence_exit": rule})
        assert r.status_code == 400
    with running_server(tiny_model_dir) as bare:  # no probe beside this checkpoint
        rule = {"criterion": "learned", "threshold": 0.5}
        r = httpx.post(f"{bare.url}/v1/completions", json={**body, "recurrence_exit": rule})
        assert r.status_code == 400 and "calibrate" in r.json()["error"]["message"]


def test_the_probe_logit_is_its_linear_layer_on_the_features() -> None:
    probe = ExitProbe(16, mean_recurrence=4)
    torch.nn.init.normal_(probe.linear.weight)
    before, after = torch.randn(9, 16), torch.randn(9, 16)
    full = probe.linear(probe.features(before, after, 3)).squeeze(-1)
    assert torch.allclose(probe.logit(before, after, 3), full, atol=1e-5)
    p = torch.sigmoid(full)
    assert probe.exits(before, after, 3, 0.5).tolist() == (p >= 0.5).tolist()
    ran = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])  # per-row loops and thresholds
    per_row = probe.linear(torch.cat([probe.features(before[i : i + 1], after[i : i + 1], int(ran[i]))
                                      for i in range(9)])).squeeze(-1)  # fmt: skip
    assert torch.allclose(probe.logit(before, after, ran), per_row, atol=1e-5)
    for q in (0.0, 0.3, 0.9, 1.0):  # a float threshold as a tensor of them, ends included
        as_tensor = probe.exits(before, after, 3, torch.full((9,), q))
        assert probe.exits(before, after, 3, q).tolist() == as_tensor.tolist()
    assert probe.exits(before, after, 3, 0.0).all() and not probe.exits(before, after, 3, 1.0).any()


def test_auto_picks_the_fastest_point_within_the_budget(calibrated) -> None:
    directory, report = calibrated
    frontier = Frontier.from_calibration(report, has_probe=True)
    best = min(p.nll for p in frontier.points)
    for cost in (0.0, 0.01, 0.05, 1.0):
        point = frontier.cheapest(cost, max_depth=64)
        assert point.nll <= best * (1 + cost)
        every = [*report["adaptive"], *({"nll": v, "tokens_per_s": report["tokens_per_s_by_depth"][d]}
                                        for d, v in report["loss_by_depth"].items())]  # fmt: skip
        assert all(
            r["tokens_per_s"] <= point.tokens_per_s for r in every if r["nll"] <= best * (1 + cost)
        )
    with running_server(directory, "--kv-policy", "per-loop") as server:
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]["recurrence"]
        assert card["frontier"] == [p.public() for p in frontier.points]
        chosen = frontier.cheapest(0.05, max_depth=64)
        body = {
            "prompt": "import os\n",
            "max_tokens": 4,
            "recurrence_exit": {"criterion": "auto", "max_nll_cost": 0.05},
        }
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if chosen.criterion is None:
            assert r.json()["usage"]["recurrence"]["mean_depth"] == chosen.depth
        assert r.json()["usage"]["recurrence"]["mean_depth"] <= chosen.depth
        clash = httpx.post(f"{server.url}/v1/completions", json={**body, "recurrence_depth": 3})
        assert clash.status_code == 400 and clash.json()["error"]["param"] == "recurrence_depth"
        missing = httpx.post(
            f"{server.url}/v1/completions", json={**body, "recurrence_exit": {"criterion": "auto"}}
        )
        assert missing.status_code == 400


def test_auto_chooses_within_max_depth_even_off_the_global_front() -> None:
    """The front over every depth may hold only points deeper than --max-depth allows; auto
    must then pick among the allowed ones, not a depth the request would be refused."""
    calibration = {"loss_by_depth": {"4": 2.0, "8": 1.9}, "tokens_per_s_by_depth": {"4": 100, "8": 50},
                   "adaptive": [{"criterion": "kl", "threshold": 0.01, "depth": 12, "nll": 1.85,
                                 "mean_depth": 5.0, "tokens_per_s": 120}]}  # fmt: skip
    frontier = Frontier.from_calibration(calibration, has_probe=False)
    assert [p.depth for p in frontier.points] == [12]
    assert frontier.cheapest(0.0, max_depth=8).depth == 8
    assert frontier.cheapest(0.1, max_depth=8).depth == 4
    assert frontier.cheapest(0.1, max_depth=2) is None
    learned = {**calibration, "adaptive": [{**calibration["adaptive"][0], "criterion": "learned"}]}
    assert [p.depth for p in Frontier.from_calibration(learned, has_probe=False).points] == [8, 4]


def test_mixed_exit_rules_in_one_batch_decide_as_they_would_alone() -> None:
    """The exit tests run vectorised over every group of a loop: a batch mixing residual,
    learned, kl and no rule gives each request the tokens and depths it gets alone."""
    from parcae_serve.server.engine.engine import Engine, EngineConfig
    from parcae_serve.server.engine.sampling import SamplingParams
    from parcae_serve.server.engine.scheduler import SchedulerConfig
    from parcae_serve.server.engine.sequence import EngineRequest, LoopParams, RecurrenceExit
    from tests.helpers import outputs_together, random_model
    from tests.server.test_kv_exact import NOISY

    model = random_model(NOISY, seed=3)
    probe = ExitProbe(NOISY.d_rec, NOISY.mean_recurrence)
    torch.manual_seed(0)
    torch.nn.init.normal_(probe.linear.weight, std=0.3)
    rules = [RecurrenceExit("residual", 0.3, 2), RecurrenceExit("learned", 0.5, 1), None,
             RecurrenceExit("kl", 0.05, 2), RecurrenceExit("learned", 0.7, 2)]  # fmt: skip
    requests = [EngineRequest([3 + i, 40, 41, 42 + i], SamplingParams(max_tokens=6, seed=i),
                              LoopParams(7, rule)) for i, rule in enumerate(rules)]  # fmt: skip

    def run(batch: list) -> list:
        config = EngineConfig(
            SchedulerConfig(prefill_chunk=8), "per-loop", kv_cache_bytes=8 * 2**20
        )
        engine = Engine(model, config, exit_probe=probe)
        engine.start()
        try:
            return [[(o.token, o.depth) for o in outs] for outs in outputs_together(engine, batch)]
        finally:
            engine.stop()

    together = run(requests)
    assert together == [run([r])[0] for r in requests]
    assert len({d for outs in together for _, d in outs}) > 2  # the rules really exited apart
