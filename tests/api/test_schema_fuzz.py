"""Property-based fuzzing of the REST API from its own OpenAPI schema (schemathesis, in-process over WSGI).

Every operation of /api/schema/ is called with the schema's examples, schemathesis' coverage cases and a
bounded number of generated cases (fixed seed), as a platform admin, and again as a viewer. Whatever comes
in: never a 5xx; every error is a JSON body with a `detail`, and a 400 also an `errors` mapping naming the
fields; a documented answer matches its schema (status, content type, body); input the schema calls invalid
is refused; a viewer's writes are refused (403), never carried out.

Path ids are sometimes replaced by ids of real rows (a draft rollout, an eval suite and run, an engine, a
model version), so detail views and actions run on real objects, not only on 404s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.urls import Resolver404, resolve
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from accounts.roles import Role
from config.wsgi import application
from tests.conftest import Member, _member
from tests.rollouts.helpers import canary_plan, version

# CI-sized: about three minutes for both roles on two cores. FUZZ_EXAMPLES raises it for a longer local run.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))


def _schema(*, phases: list[str], max_examples: int) -> Any:
    loaded = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)
    # deterministic: the same cases every run. with_security_parameters=False: the Authorization header is
    # ours (an admin's or a viewer's token), not generated.
    loaded.config.generation.update(max_examples=max_examples, deterministic=True, with_security_parameters=False)
    loaded.config.phases.update(phases=phases)
    loaded.hook(flatmap_path_parameters)
    return loaded


@schemathesis.serializer("application/jsonl")
def _jsonl(ctx: Any, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    return json.dumps(value).encode()

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance, negative_data_rejection]
WRITES = {"POST", "PUT", "PATCH", "DELETE"}

# Ids of real rows, by path parameter name; filled by the `world` fixture before any case is generated.
KNOWN: dict[str, Any] = {}


def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    generated = path_parameters or {}
    # Only where the generated value has the right type: a negative case (rollout_id=null) must stay negative.
    known = {
        name: KNOWN[name] for name, value in generated.items()
        if name in KNOWN and type(value) is type(KNOWN[name])
    }
    if not known:
        return st.just(path_parameters)
    return st.sampled_from([generated, {**generated, **known}])


# The admin gets everything: the schema's examples, the coverage cases (boundaries, missing and wrong-typed
# fields, undeclared methods) and generated ones. A viewer's writes are refused before their body is read, so
# generated cases are enough there.
admin_schema = _schema(phases=["examples", "coverage", "fuzzing"], max_examples=MAX_EXAMPLES)
viewer_schema = _schema(phases=["examples", "fuzzing"], max_examples=MAX_EXAMPLES)


@pytest.fixture
def world(db: None) -> Iterator[dict[str, Member]]:
    from evals.services import eval_run_create, eval_suite_create
    from rollouts.actors import SYSTEM
    from rollouts.services import rollout_create
    from serving.models import EngineWorker

    v1 = version("adder-v1")
    version("adder-v2")
    rollout = rollout_create(plan=canary_plan(), actor=SYSTEM).rollout
    suite = eval_suite_create(name="small", jsonl_data='{"id": "a", "prompt": "1+1=", "reference": "2"}\n')
    run = eval_run_create(suite=suite, model_version=v1, scorers=["exact_match"])
    worker = EngineWorker.objects.filter(model_version=v1).first()
    assert worker is not None
    KNOWN.update(rollout_id=rollout.pk, suite_id=suite.pk, run_id=run.pk, worker_id=worker.pk, ref=v1.label)
    # The WSGI app closes "old" connections around each request, as it must in production; inside the test's
    # transaction that would close the test's own connection (Django's test client disconnects these too).
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield {"admin": _member("fuzz-admin", [Role.ADMIN]), "viewer": _member("fuzz-viewer", [Role.VIEWER])}
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)
        KNOWN.clear()


def assert_error_names_the_problem(response: Any) -> None:
    if response.status_code < 400:
        return
    content_type = {name.lower(): values for name, values in response.headers.items()}.get("content-type", [""])
    assert content_type[0].startswith("application/json"), response.headers
    body = json.loads(response.text)
    assert isinstance(body.get("detail"), str) and body["detail"], body
    if response.status_code == 400:
        errors = body.get("errors")
        assert isinstance(errors, dict) and errors, body
        assert all(isinstance(reasons, list) and reasons for reasons in errors.values()), body


def _routed(response: Any) -> bool:
    try:
        resolve(urlsplit(response.request.url).path)
    except Resolver404:
        return False
    return True


FUZZ_SETTINGS = settings(
    suppress_health_check=list(HealthCheck), deadline=None, database=None, print_blob=False,
)


@admin_schema.parametrize()
@FUZZ_SETTINGS
def test_the_api_holds_for_an_admin(case: Any, world: dict[str, Member]) -> None:
    headers = {"Authorization": f"Bearer {world['admin'].token}"}
    response = case.call(headers=headers)
    assert response.status_code < 500, response.text[:2000]
    assert_error_names_the_problem(response)
    case.validate_response(response, checks=CHECKS, headers=headers)


@viewer_schema.parametrize()
@FUZZ_SETTINGS
def test_the_api_refuses_a_viewers_writes(case: Any, world: dict[str, Member]) -> None:
    headers = {"Authorization": f"Bearer {world['viewer'].token}"}
    response = case.call(headers=headers)
    assert response.status_code < 500, response.text[:2000]
    assert_error_names_the_problem(response)
    if case.method.upper() in WRITES:
        # Refused before anything is looked at: a viewer learns nothing from a write, not even a 404 (unless
        # the URL itself is no route, `/rollouts/abc/start`, which the URL resolver answers before any view).
        refused = response.status_code in (403, 405) or (response.status_code == 404 and not _routed(response))
        assert refused, (case.method, case.path, response.status_code, response.text[:500])
    else:
        case.validate_response(response, checks=CHECKS, headers=headers)
