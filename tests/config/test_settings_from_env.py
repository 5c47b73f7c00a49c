from __future__ import annotations

import subprocess
import sys

import pytest

from config.env import EnvError, parse_database_url
from tests.support.processes import REPO_ROOT


def _manage_check(**env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PLATFORM_VAR_DIR": str(REPO_ROOT / "var" / "test-env")}
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO_ROOT, env=base | env, capture_output=True, text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DATABASE_URL": "nonsense"}, "DATABASE_URL: expected a postgres:// or sqlite:/// URL, got 'nonsense'"),
        ({"PORT": "eighty"}, "PORT: expected an integer, got 'eighty'"),
        ({"PORT": "70000"}, "PORT: expected an integer <= 65535, got 70000"),
        ({"DEBUG": "maybe"}, "DEBUG: expected one of 1/0, true/false, yes/no, on/off, got 'maybe'"),
        ({"ENGINE_CPUS": "0-x"}, "ENGINE_CPUS: expected a CPU list such as 0 or 0-3,6: '0-x' is not a CPU number"),
        ({"CELERY_BROKER_URL": "kafka://x"}, "CELERY_BROKER_URL: expected a redis://, amqp:// or filesystem:// URL"),
        (
            {"DATABASE_URL": "postgres://u@127.0.0.1/db"},
            "SECRET_KEY: required when DATABASE_URL points at a production database",
        ),
    ],
)
def test_a_bad_environment_value_stops_start_up_with_one_line_naming_it(env: dict[str, str], expected: str) -> None:
    result = _manage_check(**env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]


def test_secret_file_variant_is_read(tmp_path: pytest.TempPathFactory) -> None:
    secret = tmp_path / "key"  # type: ignore[operator]
    secret.write_text("from-a-file\n")
    result = subprocess.run(
        [sys.executable, "-c", "import django,os;os.environ['DJANGO_SETTINGS_MODULE']='config.settings';"
         "from django.conf import settings;print(settings.SECRET_KEY)"],
        cwd=REPO_ROOT, env={"PATH": "/usr/bin:/bin", "SECRET_KEY_FILE": str(secret),
                            "PLATFORM_VAR_DIR": str(REPO_ROOT / "var" / "test-env")},
        capture_output=True, text=True, timeout=60,
    )
    assert result.stdout.strip() == "from-a-file", result.stderr


def test_database_urls_parse() -> None:
    pg = parse_database_url("DATABASE_URL", "postgres://alice:s%40cret@db.internal:6543/platform?sslmode=require")
    assert (pg.engine, pg.user, pg.password, pg.host, pg.port, pg.name) == (
        "django.db.backends.postgresql", "alice", "s@cret", "db.internal", "6543", "platform",
    )
    assert pg.options == {"sslmode": "require"}
    assert parse_database_url("X", "sqlite:////tmp/a.db").name == "/tmp/a.db"
    with pytest.raises(EnvError, match="host and database name required"):
        parse_database_url("DATABASE_URL", "postgres://127.0.0.1")
