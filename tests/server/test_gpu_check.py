"""bench/gpu_check.py runs on the CPU too, so the script a GPU session runs is tested here."""

from __future__ import annotations

import pytest

from bench import gpu_check


def test_gpu_check_runs_on_the_cpu_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--device", "cpu", "--shape", "tiny", "--compile", "off", "--streams", "4"]
    assert gpu_check.main(args) == 0
    out = capsys.readouterr().out
    assert "bf16 vs fp32: max abs Δ logprob" in out and "(tolerance 0.15: ok)" in out
    assert "| 4 streams, depths 4/8/12: tok/s |" in out
    assert "| one stream, T=8, speculative 2:4 / plain: tok/s |" in out and "same text: True" in out
