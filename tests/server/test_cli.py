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
    "argv",
    [["--device", "gpu"], ["--max-depth", "0"], ["--kv-policy", "shared:0"],
     ["--speculative", "1:1"], ["--speculative", "0:4"], ["--speculative", "on"]],
)  # fmt: skip
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


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [({"PARCAE_API_KEY": ""}, "api_key", []),
     ({"PARCAE_API_KEY": "sk-abc"}, "api_key", ["sk-abc"]),
     ({"PARCAE_API_KEY": '["a", "b"]'}, "api_key", ["a", "b"]),
     ({"PARCAE_SERVED_MODEL_NAME": "m, m2"}, "served_model_name", ["m", "m2"]),
     ({"PARCAE_ALLOWED_ORIGINS": ""}, "allowed_origins", []),
     ({"PARCAE_PRESET": 'fast={"recurrence_depth":2}'}, "preset", ['fast={"recurrence_depth":2}'])],
)  # fmt: skip
def test_list_settings_read_plain_environment_values(monkeypatch, env, field, expected) -> None:
    """A deploy sets PARCAE_API_KEY to one key, or to nothing: neither may stop the server."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert getattr(parse_args([]), field) == expected


@pytest.mark.parametrize(
    "flags",
    [["--api-key-file", "{empty}"], ["--api-key", ""], ["--served-model-name", "a@T4"],
     ["--preset", 'x={"recurrence_depth":0}'], ["--preset", 'x={"kv_policy":"bogus"}'],
     ["--default-depth", "65"]],
)  # fmt: skip
def test_settings_that_would_fail_every_request_are_refused_at_start(tmp_path, flags) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# to be filled\n\n")
    with pytest.raises(SystemExit):
        parse_args([f.replace("{empty}", str(empty)) for f in flags])


def test_idle_kernel_threads_spin_briefly_unless_the_user_chose() -> None:
    from parcae_serve.server.api.openmp import SPIN_COUNT, spin_briefly_when_idle

    for given, want in [
        ({}, {"GOMP_SPINCOUNT": SPIN_COUNT}),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"GOMP_SPINCOUNT": "10"}, {"GOMP_SPINCOUNT": "10"}),
    ]:
        environ = dict(given)
        spin_briefly_when_idle(environ)
        assert environ == want
