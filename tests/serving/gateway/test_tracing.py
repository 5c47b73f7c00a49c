"""Tracing is off unless an OTLP endpoint is set, and then costs nothing: OpenTelemetry is not even imported.
(Traces when it is on: test_attempts.py in process, tests/faults/test_gateway_faults.py into vLLM.)"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.processes import REPO_ROOT

PROBE = """
import sys
from serving.gateway.tracing import Tracing
tracing = Tracing.from_environment()
print(tracing.enabled, sorted({m.split(".")[0] for m in sys.modules if m.startswith("opentelemetry")}))
"""


def probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")} | env
    done = subprocess.run([sys.executable, "-c", PROBE], env=clean, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_without_an_otlp_endpoint_tracing_is_off_and_opentelemetry_never_imported() -> None:
    assert probe() == "False []"


def test_with_an_otlp_endpoint_tracing_is_on() -> None:
    assert probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318") == "True ['opentelemetry']"
