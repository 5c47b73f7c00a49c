"""A small client of the rollouts REST API."""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Any

import httpx

from rolloutctl import __version__

DEFAULT_URL = "http://127.0.0.1:8000"


class ApiError(Exception):
    """The API refused the request; `status` is its HTTP status, `body` its JSON error."""

    def __init__(self, status: int, body: dict[str, Any] | None, text: str = "") -> None:
        detail = (body or {}).get("detail") or text or f"HTTP {status}"
        super().__init__(detail)
        self.status = status
        self.body = body or {}
        self.detail = str(detail)

    def describe(self) -> str:
        lines = [f"error {self.status}: {self.detail}"]
        for field, reasons in (self.body.get("errors") or {}).items():
            for reason in reasons if isinstance(reasons, list) else [reasons]:
                line = f"  {field}: {reason}"
                if line.strip() != f"{self.detail}".strip() and reason != self.detail:
                    lines.append(line)
        return "\n".join(lines)


class ConfigError(Exception):
    pass


def token_from_env() -> str:
    token = os.environ.get("RAMP_TOKEN")
    token_file = os.environ.get("RAMP_TOKEN_FILE")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"RAMP_TOKEN_FILE: cannot read {token_file!r} ({exc.strerror})") from exc
    if not token:
        raise ConfigError("RAMP_TOKEN is not set: create a token with `manage.py create_api_token USERNAME`")
    return token


def idempotency_key_for(content: bytes, *, flags: str) -> str:
    """Derived from the plan file (and the CI run, when there is one), so a retried CI step replays the
    rollout its first try created, while the next pipeline run makes a new one."""
    scope = os.environ.get("RAMP_IDEMPOTENCY_SCOPE") or "/".join(
        os.environ.get(name, "") for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "CI_PIPELINE_ID", "BUILD_ID")
    )
    digest = hashlib.sha256(scope.encode() + b"\0" + flags.encode() + b"\0" + content).hexdigest()
    return f"rolloutctl-{digest[:40]}"


def action_idempotency_key(*, action: str, rollout_id: int, expected_version: int | None, step: int | None) -> str:
    """The Idempotency-Key of an action when none is given.

    In a CI run (RAMP_IDEMPOTENCY_SCOPE, or the run ids GitHub, GitLab or Jenkins set) it is derived from the
    run, the action, the rollout and the version it expects (when given): a retried CI step sends the
    same key and gets the first answer instead of acting twice. Outside CI, with --expect-version, it is
    derived from the action, the rollout and that version (the same command again is the same action);
    otherwise it is new for each command, and covers the command's own retries after a timeout."""
    scope = os.environ.get("RAMP_IDEMPOTENCY_SCOPE") or "/".join(
        os.environ.get(name, "") for name in ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "CI_PIPELINE_ID", "BUILD_ID")
    )
    in_ci = bool(scope.strip("/"))
    if not in_ci and expected_version is None:
        return f"rolloutctl-{secrets.token_hex(20)}"
    parts = [scope if in_ci else "", action, str(rollout_id), str(expected_version or ""), str(step if step is not None else "")]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"rolloutctl-{digest[:40]}"


class Client:
    def __init__(self, *, url: str, token: str, timeout: float = 30.0, transport: httpx.BaseTransport | None = None) -> None:
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"rolloutctl/{__version__}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise ApiError(response.status_code, body if isinstance(body, dict) else None, response.text[:300])
        return response.json() if response.content else None

    def create(self, *, content: bytes, yaml: bool, start: bool, start_when_ready: bool, idempotency_key: str) -> tuple[dict[str, Any], bool]:
        params = {"start": "true"} if start else {}
        if start_when_ready:
            params["start_when_ready"] = "true"
        headers = {
            "Content-Type": "application/yaml" if yaml else "application/json",
            "Idempotency-Key": idempotency_key,
        }
        response = self.http.post("/api/v1/rollouts", content=content, params=params, headers=headers)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise ApiError(response.status_code, body if isinstance(body, dict) else None, response.text[:300])
        return response.json(), response.headers.get("Idempotent-Replayed") == "true"

    def validate(self, *, content: bytes, yaml: bool) -> dict[str, Any]:
        return self._call(
            "POST", "/api/v1/rollouts/validate", content=content,
            headers={"Content-Type": "application/yaml" if yaml else "application/json"},
        )  # fmt: skip

    def get(self, rollout_id: int) -> dict[str, Any]:
        return self._call("GET", f"/api/v1/rollouts/{rollout_id}")

    def events(self, rollout_id: int, *, after: int | None = None) -> list[dict[str, Any]]:
        params = {"after": str(after)} if after is not None else {}
        return self._call("GET", f"/api/v1/rollouts/{rollout_id}/events", params=params)

    def list(self, *, live: bool | None = None, alias: str | None = None) -> dict[str, Any]:
        params: dict[str, str] = {}
        if live is not None:
            params["live"] = "true" if live else "false"
        if alias:
            params["alias"] = alias
        return self._call("GET", "/api/v1/rollouts", params=params)

    def action(
        self, rollout_id: int, action: str, *, expected_version: int, idempotency_key: str, reason: str = "",
        step_index: int | None = None, retries: int = 2, backoff_s: float = 1.0,
    ) -> tuple[dict[str, Any], bool]:  # fmt: skip
        """POST an action with the version the caller saw and an Idempotency-Key. A timeout or a dropped
        connection is retried with the same key, so an action whose answer was lost is not done twice.
        Returns (the rollout after the action, whether this is the replayed first answer)."""
        body: dict[str, Any] = {"reason": reason, "expected_version": expected_version}
        if step_index is not None:
            body["step_index"] = step_index
        path = f"/api/v1/rollouts/{rollout_id}/{action.replace('_', '-')}"
        attempt = 0
        while True:
            try:
                response = self.http.post(path, json=body, headers={"Idempotency-Key": idempotency_key})
                break
            except (httpx.TimeoutException, httpx.NetworkError):
                if attempt >= retries:
                    raise
                attempt += 1
                time.sleep(backoff_s * attempt)
        if response.status_code >= 400:
            try:
                error = response.json()
            except ValueError:
                error = None
            raise ApiError(response.status_code, error if isinstance(error, dict) else None, response.text[:300])
        return response.json(), response.headers.get("Idempotent-Replayed") == "true"
