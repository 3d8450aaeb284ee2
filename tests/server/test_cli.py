"""`parcae-serve` flags: documented, validated before anything loads."""

import subprocess
import sys

import pytest

from parcae_serve.server.api.settings import parse_args

CONTRACT_FLAGS = ["--host", "--port", "--model", "--tokenizer", "--device", "--dtype",
                  "--max-batch", "--max-context", "--max-depth", "--kv-policy",
                  "--kv-cache-bytes", "--max-queue", "--api-key"]  # fmt: skip


def test_help_documents_every_contract_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "parcae_serve.server.api.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    for flag in CONTRACT_FLAGS:
        assert flag in out


@pytest.mark.parametrize(
    "argv", [["--device", "gpu"], ["--max-depth", "0"], ["--kv-policy", "shared:0"]]
)
def test_bad_flags_exit_with_usage_error(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_environment_variables_set_defaults_and_flags_override(monkeypatch) -> None:
    monkeypatch.setenv("PARCAE_MAX_DEPTH", "12")
    monkeypatch.setenv("PARCAE_KV_POLICY", "last:2")
    assert parse_args([]).max_depth == 12
    assert parse_args([]).kv_policy == "last:2"
    assert parse_args(["--max-depth", "7"]).max_depth == 7
