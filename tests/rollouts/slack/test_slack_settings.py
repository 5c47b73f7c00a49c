"""Slack's settings: secrets from the environment or *_FILE, per-alias channels that fail loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.env import EnvError, env_map
from tests.support.processes import REPO_ROOT


def _settings(env: dict[str, str], expression: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PLATFORM_VAR_DIR": str(REPO_ROOT / "var" / "test-env"),
            "DJANGO_SETTINGS_MODULE": "config.settings"}  # fmt: skip
    code = f"import django; django.setup(); from django.conf import settings; print({expression})"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=base | env, capture_output=True, text=True, timeout=60)


def test_alias_channels_and_secrets_from_files(tmp_path: Path) -> None:
    token = tmp_path / "bot-token"
    token.write_text("xoxb-from-a-file\n")
    result = _settings(
        {"SLACK_ALIAS_CHANNELS": "adder=#adder-rollouts, chat=C0123ABCD", "SLACK_BOT_TOKEN_FILE": str(token),
         "SLACK_SIGNING_SECRET": "s3cret"},
        "settings.SLACK_ALIAS_CHANNELS, settings.SLACK_BOT_TOKEN, settings.SLACK_SIGNING_SECRET",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'adder': '#adder-rollouts', 'chat': 'C0123ABCD'} xoxb-from-a-file s3cret"


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("adder", "expected key=value pairs separated by commas, got 'adder'"),
        ("adder=", "expected key=value pairs"),
        ("adder=#a,adder=#b", "'adder' is given twice"),
        ("adder=adder-rollouts", "the value for 'adder' must be #channel-name or a channel id, got 'adder-rollouts'"),
    ],
)
def test_a_bad_alias_channel_list_stops_start_up_naming_it(raw: str, says: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_ALIAS_CHANNELS", raw)
    with pytest.raises(EnvError) as refused:
        env_map("SLACK_ALIAS_CHANNELS", {}, value_pattern=r"#[a-z0-9][a-z0-9._-]*|[CGD][A-Z0-9]{6,}",
                value_is="#channel-name or a channel id")  # fmt: skip
    assert str(refused.value).startswith("SLACK_ALIAS_CHANNELS: ") and says in str(refused.value)
    # And the real settings refuse it the same way, in one line.
    result = _settings({"SLACK_ALIAS_CHANNELS": raw}, "1")
    assert result.returncode != 0 and "SLACK_ALIAS_CHANNELS: " in result.stderr.strip().splitlines()[-1]
