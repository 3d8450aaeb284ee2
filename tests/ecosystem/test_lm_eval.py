"""lm-evaluation-harness against a live server (issue #15): `lm_eval --model local-completions
--model_args base_url=...,model=...` with nothing else must run log-likelihood and generate_until
tasks, offline, without a tokenizer argument (lm-eval's default `tokenizer_backend="auto"` picks
the server's /tokenizer_info + /tokenize), and a depth chosen in the model name must take effect.

The two tiny tasks live in lm_eval_tasks/ (Python snippets; their data files are named relative
to that folder, which is lm_eval's working directory here)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_server

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
pytest.importorskip("aiohttp", reason="lm-eval's API models need its [api] extra (aiohttp)")

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
CHOICE, COMPLETE = "parcae_code_choice", "parcae_code_complete"
LIMIT = 5
RUN_TIMEOUT_S = 240
SAME_LL_ATOL = 1e-3


@dataclass
class Run:
    """One `python -m lm_eval` invocation and what it left behind."""

    args: list[str]
    returncode: int
    output: str
    out_dir: Path

    def check(self) -> None:
        assert self.returncode == 0, (
            f"lm_eval exited with {self.returncode}: {' '.join(self.args)}\n"
            f"--- last output ---\n{self.output[-6000:]}"
        )

    def results(self) -> dict:
        self.check()
        files = sorted(self.out_dir.rglob("results_*.json"))
        assert len(files) == 1, f"expected one results file under {self.out_dir}, got {files}"
        return json.loads(files[0].read_text())

    def samples(self, task: str) -> list[dict]:
        self.check()
        files = sorted(self.out_dir.rglob(f"samples_{task}_*.jsonl"))
        assert len(files) == 1, f"expected one samples file for {task}, got {files}"
        rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        return sorted(rows, key=lambda row: row["doc_id"])

    def loglikelihoods(self, task: str = CHOICE) -> dict[tuple[int, int], float]:
        """(doc_id, choice index) -> the summed log-likelihood lm-eval computed for it."""
        out = {}
        for row in self.samples(task):
            for i, resp in enumerate(row["resps"]):
                out[row["doc_id"], i] = float(resp[0][0])  # [[loglikelihood, is_greedy]]
        return out


def lm_eval_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),  # a fresh datasets cache per run: the json files are really read
        TOKENIZERS_PARALLELISM="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def start_lm_eval(
    url: str, model_args: str, tasks: list[str], out_dir: Path, env: dict
) -> tuple[list[str], subprocess.Popen, Path]:
    """`python -m lm_eval` in the background, its output going to a log beside its results."""
    args = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
            "--model_args", f"base_url={url}/v1/completions,{model_args}",
            "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR),
            "--limit", str(LIMIT), "--output_path", str(out_dir), "--log_samples"]  # fmt: skip
    out_dir.mkdir(parents=True)
    log = out_dir / "lm_eval.log"
    with open(log, "w") as sink:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(args, cwd=TASKS_DIR, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)  # fmt: skip
    return args, proc, log


@pytest.fixture(scope="module")
def server_url(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_model_dir) as server:
        yield server.url


@pytest.fixture(scope="module")
def model_id(server_url: str) -> str:
    return httpx.get(f"{server_url}/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def runs(server_url: str, model_id: str, tmp_path_factory) -> dict[str, Run]:
    """Every lm_eval run the tests read, started together (each spends most of its time
    importing and indexing lm-eval's own tasks, not on the server)."""
    root = tmp_path_factory.mktemp("lm-eval")
    plan = {
        # the command line: nothing but base_url and model
        "plain": (f"model={model_id}", [CHOICE, COMPLETE]),
        "T1": (f"model={model_id}@T1", [CHOICE]),  # against plain's default depth, 3
        "text": (f"model={model_id},tokenized_requests=False", [CHOICE]),
    }
    deadline = time.monotonic() + RUN_TIMEOUT_S
    procs = {name: start_lm_eval(server_url, model_args, tasks, root / name,
                                 lm_eval_env(root / f"{name}-hf-home"))
             for name, (model_args, tasks) in plan.items()}  # fmt: skip
    try:
        for name, (_, proc, log) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"lm_eval run {name!r} took over {RUN_TIMEOUT_S} s:\n"
                            f"{log.read_text(errors='replace')[-6000:]}")  # fmt: skip
    finally:
        for _, proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {name: Run(args, proc.returncode, log.read_text(errors="replace"), root / name)
            for name, (args, proc, log) in procs.items()}  # fmt: skip


def test_the_server_offers_what_lm_eval_auto_detects(server_url: str) -> None:
    """lm-eval's check_remote_tokenizer_support (lm_eval/utils.py): GET /tokenizer_info answers a
    JSON object holding `eos_token`, and POST /tokenize answers `tokens`; otherwise it falls back
    to a Hugging Face tokenizer named by the model id, which needs the hub."""
    info = httpx.get(f"{server_url}/tokenizer_info")
    assert info.status_code == 200, info.text
    assert isinstance(info.json(), dict) and "eos_token" in info.json(), info.json()
    body = {"prompt": "test", "add_special_tokens": False}
    tokens = httpx.post(f"{server_url}/tokenize", json=body).json().get("tokens")
    assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens)
    # lm-eval reads the ids of the special tokens by tokenizing their text: one id each
    for name in ("eos_token", "bos_token"):
        text = info.json().get(name)
        if text is not None:
            body = {"prompt": text, "add_special_tokens": False}
            assert len(httpx.post(f"{server_url}/tokenize", json=body).json()["tokens"]) == 1


def test_both_kinds_of_task_run_with_only_base_url_and_model(runs: dict[str, Run]) -> None:
    run = runs["plain"]
    results = run.results()["results"]
    acc = results[CHOICE]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert 0.0 <= results[COMPLETE]["exact_match,none"] <= 1.0
    assert run.results()["n-samples"][COMPLETE]["effective"] == LIMIT
    lls = run.loglikelihoods()
    assert len(lls) == LIMIT * 3 and all(math.isfinite(v) and v < 0 for v in lls.values())
    generations = [row["resps"][0][0] for row in run.samples(COMPLETE)]
    assert len(generations) == LIMIT and all(isinstance(g, str) for g in generations)
    assert any(generations), "every generation came back empty"
    assert not any("\n" in g for g in generations), f"the stop string leaked: {generations}"


def test_the_depth_in_the_model_name_changes_the_loglikelihoods(runs: dict[str, Run]) -> None:
    t1, t3 = runs["T1"].loglikelihoods(), runs["plain"].loglikelihoods()
    assert t1.keys() == t3.keys() and len(t1) == LIMIT * 3
    differences = [abs(t1[k] - t3[k]) for k in t1]
    assert max(differences) > 0.05, f"@T1 and the default depth scored alike: {t1} vs {t3}"


def test_text_and_token_prompts_give_the_same_loglikelihoods(runs: dict[str, Run]) -> None:
    """tokenized_requests=False sends the detokenized text and slices the echoed logprobs at the
    context length lm-eval counted with /tokenize (no BOS): a token the server adds to a text
    prompt would shift the scored span by one."""
    tokens, text = runs["plain"].loglikelihoods(), runs["text"].loglikelihoods()
    assert tokens.keys() == text.keys() and len(tokens) == LIMIT * 3
    far = {k: (tokens[k], text[k]) for k in tokens if abs(tokens[k] - text[k]) > SAME_LL_ATOL}
    assert not far, f"(doc, choice): (token prompt, text prompt) log-likelihoods differ: {far}"
