"""Secrets are in no log, no response and no tracked file.

The first test runs the platform as production does (the web app, a Celery worker and the gateway as
separate real processes, plus `setup_platform`), every one at LOG_LEVEL=DEBUG with distinctive secrets,
drives a session that uses each secret the way it is meant to be used (and a wrong one beside it), then
reads every byte the processes wrote and every response they sent. The second scans `git ls-files`."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection

from accounts.roles import Role
from accounts.services import TOKEN_PREFIX, api_token_create, user_create
from config.tasks import ping
from serving.services import GATEWAY_KEY_PREFIX, gateway_key_create
from tests.rollouts.helpers import canary_plan, version
from tests.rollouts.slack.helpers import command_body
from tests.support.engines import free_port
from tests.support.processes import REPO_ROOT, SERVER_FLAGS, VENV_BIN, celery_queues, child_env, child_process
from tests.support.slack_standin import SlackStandin, slack_standin

# A secret shows up in a log or a page whole, cut short, or as the tail of a longer line: any run of this
# many of its characters counts. Longer than the prefixes that are shown on purpose (an API token's 12,
# a gateway key's 10), so those are not leaks.
WINDOW = 16
SLACK_TEAM = "T0LEAKPRB"
SLACK_ADMIN_USER = "U0LEAKADM"


def fragments(secret: str) -> set[str]:
    if len(secret) <= WINDOW:
        return {secret}
    return {secret[start:start + WINDOW] for start in range(len(secret) - WINDOW + 1)}


def leaks(text: str, named_secrets: dict[str, str]) -> list[str]:
    return sorted(name for name, secret in named_secrets.items() if any(part in text for part in fragments(secret)))


def test_a_secret_is_found_whole_cut_short_or_inside_other_text() -> None:
    secret = "skleak" + secrets.token_urlsafe(40)
    named = {"SECRET_KEY": secret, "short": "pw-12345"}
    assert leaks(f"key={secret}", named) == ["SECRET_KEY"]
    assert leaks(f"token {secret[10:10 + WINDOW]}...", named) == ["SECRET_KEY"]
    assert leaks("login failed for pw-12345!", named) == ["short"]
    assert leaks(secret[:WINDOW - 1] + " and pw-1234", named) == []


@dataclass
class Transcript:
    """Every response the session got, status line, headers and body, as text."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def keep(self, label: str, response: httpx.Response) -> httpx.Response:
        headers = "\n".join(f"{name}: {value}" for name, value in response.headers.multi_items())
        self.entries.append((label, f"{response.status_code}\n{headers}\n\n{response.text}"))
        return response


def _slack_headers(body: bytes, secret: str) -> dict[str, str]:
    timestamp = str(int(time.time()))
    digest = hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": timestamp, "X-Slack-Signature": f"v0={digest}",
            "Content-Type": "application/x-www-form-urlencoded"}  # fmt: skip


def _csrf(client: httpx.Client, path: str, transcript: Transcript) -> str:
    page = transcript.keep(f"GET {path}", client.get(path))
    assert page.status_code == 200, page.status_code
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
    assert found, f"no CSRF token on {path}"
    return found.group(1)


def _log_in(client: httpx.Client, username: str, password: str, transcript: Transcript) -> httpx.Response:
    token = _csrf(client, "/login/", transcript)
    form = {"username": username, "password": password, "csrfmiddlewaretoken": token}
    return transcript.keep(f"POST /login/ as {username}", client.post("/login/", data=form, headers={"Referer": str(client.base_url)}))


def _wait_for(standin: SlackStandin, method: str, count: int = 1, timeout_s: float = 60.0) -> None:
    calls = standin.wait_for(method, count, timeout_s=timeout_s)
    assert len(calls) >= count, f"{method}: {len(calls)} authorised calls, wanted {count}: {standin.calls}"


@pytest.fixture
def configured_secrets(transactional_db: None) -> dict[str, str]:
    """One distinctive value per secret the platform takes, and the credentials made for this run."""
    chosen = {
        "SECRET_KEY": "skleak" + secrets.token_urlsafe(40),
        "SLACK_BOT_TOKEN": "xoxb-leak-" + secrets.token_urlsafe(24),
        "SLACK_SIGNING_SECRET": "ssleak" + secrets.token_hex(20),
        "PLATFORM_ADMIN_PASSWORD": "adminpw-" + secrets.token_urlsafe(15),
        "user password": "userpw-" + secrets.token_urlsafe(15),
    }
    database_password = connection.settings_dict.get("PASSWORD") or ""
    if len(database_password) >= 8:  # SQLite has none; a short one would match by chance
        chosen["DATABASE_URL password"] = database_password
    return chosen


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


def test_a_full_session_at_debug_level_leaves_no_secret_in_logs_or_responses(
    configured_secrets: dict[str, str], log_dir: Path
) -> None:
    named = dict(configured_secrets)
    owner = user_create(username="leak-owner", password=named["user password"], roles=[Role.RELEASE_MANAGER])
    api_token = api_token_create(user=owner, name="leak-probe").raw
    gateway_key = gateway_key_create(name="leak-probe").raw
    named |= {"API token": api_token, "gateway key": gateway_key}
    version("adder-v1")  # a ready static engine on a closed port: the gateway routes, the upstream refuses
    version("adder-v2")
    transcript = Transcript()

    with slack_standin(token=named["SLACK_BOT_TOKEN"]) as standin, ExitStack() as stack:
        env = child_env(
            SECRET_KEY=named["SECRET_KEY"], SLACK_BOT_TOKEN=named["SLACK_BOT_TOKEN"],
            SLACK_SIGNING_SECRET=named["SLACK_SIGNING_SECRET"], PLATFORM_ADMIN_PASSWORD=named["PLATFORM_ADMIN_PASSWORD"],
            SLACK_API_BASE_URL=standin.api_url, LOG_LEVEL="DEBUG", GATEWAY_RECORD_FLUSH_S="0.1",
            # Plain HTTP on loopback: on PostgreSQL the settings count as production and would mark the
            # cookies Secure, which a client never sends back over http (the login would fail on CSRF).
            SECURE_COOKIES="false",
        )  # fmt: skip
        setup = subprocess.run([str(VENV_BIN / "python"), "manage.py", "setup_platform", "--no-demo"], cwd=REPO_ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)  # fmt: skip
        (log_dir / "setup_platform.log").write_bytes(setup.stdout)
        assert setup.returncode == 0, setup.stdout[-2000:]

        worker_args = [str(VENV_BIN / "celery"), "-A", "config", "worker", "--loglevel", "DEBUG", "--concurrency", "1",
                       "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"leak-{time.time_ns()}@%h",
                       "-Q", celery_queues()]  # fmt: skip
        stack.enter_context(child_process(worker_args, log_path=log_dir / "worker.log", env=env, ready="ready.", timeout_s=90))
        servers = {}
        for name, app in (("web", "config.asgi:application"), ("gateway", "serving.gateway.asgi:application")):
            port = free_port()
            args = [str(VENV_BIN / "uvicorn"), app, "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS, "--log-level", "debug"]
            stack.enter_context(child_process(args, log_path=log_dir / f"{name}.log", env=env,
                                              ready="Application startup complete", timeout_s=90))  # fmt: skip
            servers[name] = f"http://127.0.0.1:{port}"
        web = stack.enter_context(httpx.Client(base_url=servers["web"], timeout=30, trust_env=False))
        admin_web = stack.enter_context(httpx.Client(base_url=servers["web"], timeout=30, trust_env=False))
        api = stack.enter_context(httpx.Client(base_url=servers["web"], timeout=30, trust_env=False,
                                               headers={"Authorization": f"Bearer {api_token}"}))  # fmt: skip
        gateway = stack.enter_context(httpx.Client(base_url=servers["gateway"], timeout=30, trust_env=False))
        keep = transcript.keep

        # People log in to the web UI: a wrong password first, then the right ones.
        assert _log_in(web, "leak-owner", "userpw-" + secrets.token_urlsafe(15), transcript).status_code == 200
        assert _log_in(web, "leak-owner", named["user password"], transcript).status_code == 302
        assert _log_in(admin_web, "admin", named["PLATFORM_ADMIN_PASSWORD"], transcript).status_code == 302
        assert keep("GET /", web.get("/")).status_code == 200

        # CI over the REST API with its token, and someone with a token that is not one.
        assert keep("GET /api/v1/me", api.get("/api/v1/me")).status_code == 200
        wrong_token = {"Authorization": "Bearer rmp_" + secrets.token_urlsafe(32)}
        assert keep("GET /api/v1/me wrong token", api.get("/api/v1/me", headers=wrong_token)).status_code == 401
        plan = canary_plan(steps=[
            {"weight": 0.1, "min_duration_s": 3600, "requires_approval": True},
            {"weight": 0.5, "min_duration_s": 3600},
        ])  # fmt: skip
        created = keep("POST /api/v1/rollouts", api.post("/api/v1/rollouts", params={"start": "true"}, json=plan))
        assert created.status_code == 201, created.text
        rollout_id = created.json()["id"]
        assert created.json()["state"] == "awaiting_approval"
        assert keep("GET events", api.get(f"/api/v1/rollouts/{rollout_id}/events")).status_code == 200
        assert keep("POST bad plan", api.post("/api/v1/rollouts", json={"alias": 7})).status_code == 400
        assert keep("GET missing rollout", api.get("/api/v1/rollouts/987654")).status_code == 404

        # The worker asks for the approval in Slack with the bot token.
        _wait_for(standin, "chat.postMessage")

        # The admin links their Slack user and approves from Slack; a forged command is refused.
        code_page = keep("POST /account/slack", admin_web.post(
            "/account/slack", data={"action": "code", "csrfmiddlewaretoken": _csrf(admin_web, "/account/slack", transcript)},
            headers={"Referer": servers["web"] + "/account/slack"},
        ))  # fmt: skip
        link_code = re.search(r"/rollout link ([A-Z0-9-]+)", code_page.text)
        assert link_code, code_page.text[-2000:]
        slack_secret = named["SLACK_SIGNING_SECRET"]
        seen = created.json()["version"]
        for text in (f"link {link_code.group(1)}", f"approve {rollout_id}@{seen} looks fine"):
            body = command_body(text, user=SLACK_ADMIN_USER, team=SLACK_TEAM)
            answer = keep(f"/rollout {text}", web.post("/slack/commands", content=body, headers=_slack_headers(body, slack_secret)))
            assert answer.status_code == 200, answer.text
        forged_body = command_body(f"rollback {rollout_id}", user=SLACK_ADMIN_USER, team=SLACK_TEAM)
        forged = web.post("/slack/commands", content=forged_body, headers=_slack_headers(forged_body, "ssleak" + secrets.token_hex(20)))
        assert keep("forged /rollout", forged).status_code == 401
        approved = keep("GET rollout", api.get(f"/api/v1/rollouts/{rollout_id}")).json()
        assert (approved["state"], approved["step_index"]) == ("running", 0), approved
        _wait_for(standin, "chat.update")

        # Applications call the gateway with their key (the engine's port is closed) and without a valid one.
        chat = {"model": "adder", "messages": [{"role": "user", "content": "2+2="}], "max_tokens": 4}
        with_key = {"Authorization": f"Bearer {gateway_key}"}
        assert keep("GET /v1/models", gateway.get("/v1/models", headers=with_key)).status_code == 200
        refused = keep("POST chat", gateway.post("/v1/chat/completions", json=chat, headers=with_key))
        assert refused.status_code in (502, 503), refused.text
        wrong_key = {"Authorization": "Bearer gw_" + secrets.token_urlsafe(24)}
        assert keep("POST chat wrong key", gateway.post("/v1/chat/completions", json=chat, headers=wrong_key)).status_code == 401
        assert keep("POST outcome wrong key", web.post("/api/v1/events", json={}, headers=wrong_key)).status_code == 401

        # Error pages, and a task's round trip through the broker.
        assert keep("GET /no-such-page", web.get("/no-such-page")).status_code == 404
        assert keep("GET missing rollout page", web.get("/rollouts/987654")).status_code == 404
        assert keep("POST /admin/ without CSRF", admin_web.post("/admin/logout/")).status_code == 403
        assert ping.delay("leak-probe").get(timeout=60)["echo"] == "leak-probe"
    # The processes have stopped: their logs are complete, shutdown included.

    logs = {path.name: path.read_text(errors="replace") for path in sorted(log_dir.iterdir())}
    assert set(logs) == {"setup_platform.log", "worker.log", "web.log", "gateway.log"}
    # The logs really are at debug level and really saw the session, so finding nothing means something.
    # (The gateway's hot path logs nothing below a warning, so its log shows the refused engine only.)
    assert "DEBUG" in logs["web.log"] and "refused a Slack request" in logs["web.log"]
    assert "DEBUG slack_sdk" in logs["worker.log"] and "config.ping" in logs["worker.log"]
    assert "Connection refused" in logs["gateway.log"]
    found = {name: leaks(text, named) for name, text in logs.items()}
    found |= {label: leaks(text, named) for label, text in transcript.entries}
    assert {where: names for where, names in found.items() if names} == {}


# --- the repository --------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "Slack token": re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]\s*\S{20,}", re.IGNORECASE),
    # accounts.services.TOKEN_PREFIX and serving.services.GATEWAY_KEY_PREFIX, then secrets.token_urlsafe.
    "API token": re.compile(r"\brmp_[A-Za-z0-9_-]{20,}"),
    "gateway key": re.compile(r"\bgw_[A-Za-z0-9_-]{20,}"),
    "Slack webhook": re.compile(r"hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]{16,}"),
}
# Test constants that are plainly fake, each allowed where it is, by its exact text. (Written in two
# pieces here so that this file does not hold them itself.)
STANDIN_TOKEN = "xoxb" + "-standin-token"
FAKE_SECRETS = {
    ("tests/support/slack_standin.py", STANDIN_TOKEN),
    ("tests/rollouts/slack/test_slack_settings.py", "xoxb" + "-from-a-file"),
}


def tracked_files() -> Iterator[tuple[str, str]]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in listed.decode().split("\0"):
        path = REPO_ROOT / name
        if not name or not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        yield name, data.decode("utf-8", errors="replace")


def secrets_in(name: str, text: str) -> list[str]:
    found = []
    for kind, pattern in SECRET_PATTERNS.items():
        for match in pattern.finditer(text):
            if (name, match.group()) not in FAKE_SECRETS:
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{name}:{line}: {kind} {match.group()[:12]}…")
    return found


def test_the_patterns_find_real_looking_secrets() -> None:
    """Made at run time, so none of them is in the repository for the scan below to find."""
    samples: dict[str, Any] = {
        "Slack token": "xoxb-" + "1234567890-" + secrets.token_hex(12),
        "private key": "-----BEGIN " + "RSA PRIVATE KEY-----",
        "AWS access key id": "AKIA" + secrets.token_hex(8).upper(),
        "AWS secret access key": "aws_secret_access_key = " + secrets.token_urlsafe(30),
        "API token": TOKEN_PREFIX + secrets.token_urlsafe(32),
        "gateway key": GATEWAY_KEY_PREFIX + secrets.token_urlsafe(24),
        "Slack webhook": "https://hooks.slack.com/services/T0AAAAAAA/B0BBBBBBB/" + secrets.token_hex(12),
    }
    for kind, sample in samples.items():
        hits = secrets_in("x.py", f"value = '{sample}'\n")
        assert len(hits) == 1 and f": {kind} " in hits[0], (kind, hits)
    # An allowed fake is allowed only in its own file.
    assert secrets_in("tests/support/slack_standin.py", f"token = '{STANDIN_TOKEN}'") == []
    assert secrets_in("serving/services.py", f"token = '{STANDIN_TOKEN}'") != []


def test_the_token_patterns_follow_the_formats_the_code_issues() -> None:
    assert SECRET_PATTERNS["API token"].fullmatch(TOKEN_PREFIX + secrets.token_urlsafe(32))
    assert SECRET_PATTERNS["gateway key"].fullmatch(GATEWAY_KEY_PREFIX + secrets.token_urlsafe(24))


def test_no_tracked_file_holds_a_secret() -> None:
    files = dict(tracked_files())
    assert "config/settings.py" in files and len(files) > 100
    found = [hit for name, text in files.items() for hit in secrets_in(name, text)]
    assert found == []
    # Every allowed fake is still where it is said to be: the list does not outlive its reasons.
    assert [fake for fake in FAKE_SECRETS if fake[1] not in files.get(fake[0], "")] == []
