"""The evals REST API: who may do what, run creation and its errors, progress, cancel, comparisons."""

from __future__ import annotations

import pytest

from evals.models import EvalRun
from tests.evals.conftest import SMALL_SUITE

READS = [
    "/api/v1/eval-suites",
    "/api/v1/eval-suites/{suite}",
    "/api/v1/eval-suites/{suite}/items",
    "/api/v1/eval-runs",
    "/api/v1/eval-runs/{run}",
    "/api/v1/eval-runs/{run}/results",
    "/api/v1/eval-comparisons?baseline={run}&candidate={run}",
]
WRITES = [
    ("/api/v1/eval-suites", {"name": "new", "jsonl": SMALL_SUITE}),
    ("/api/v1/eval-runs", {"suite": "small", "model_version": "adder-v1", "scorers": ["exact_match"]}),
    ("/api/v1/eval-runs/{run}/cancel", {}),
]


@pytest.fixture
def run(small_suite, versions, finished_run) -> EvalRun:  # type: ignore[no-untyped-def]
    return finished_run(suite=small_suite, version=versions["adder-v1"], answer=lambda item: item.reference)


@pytest.mark.parametrize("url", READS)
def test_reads_refuse_callers_without_a_role(url: str, run: EvalRun, outsider, anonymous) -> None:  # type: ignore[no-untyped-def]
    url = url.format(suite=run.suite_id, run=run.pk)
    assert outsider.api().get(url).status_code == 403
    assert anonymous.get(url).status_code in (401, 403)


@pytest.mark.parametrize(("url", "body"), WRITES)
def test_writes_refuse_viewers_and_approvers(url: str, body: dict, run: EvalRun, viewer, approver, outsider) -> None:  # type: ignore[no-untyped-def]
    url = url.format(run=run.pk)
    for member in (viewer, approver, outsider):
        assert member.api().post(url, body, format="json").status_code == 403
    assert EvalRun.objects.count() == 1


def test_create_a_run_then_watch_its_progress_and_cancel_it(owner, viewer, small_suite, versions) -> None:  # type: ignore[no-untyped-def]
    response = owner.api().post(
        "/api/v1/eval-runs",
        {"suite": "small", "model_version": "adder-v2", "scorers": ["exact_match", {"name": "numeric"}],
         "concurrency": 2},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "queued" and body["progress"] == {"done": 0, "total": 3, "failed_items": 0, "fraction": 0.0}
    assert [s["label"] for s in body["scorers"]] == ["exact_match", "numeric"]
    detail = viewer.api().get(f"/api/v1/eval-runs/{body['id']}").json()
    assert detail["model_version"] == "adder-v2" and detail["summary"]["items"] == 0
    cancelled = owner.api().post(f"/api/v1/eval-runs/{body['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    again = owner.api().post(f"/api/v1/eval-runs/{body['id']}/cancel")
    assert again.status_code == 202


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"suite": "nope"}, "suite"),
        ({"model_version": "adder-v9"}, "model_version"),
        ({"scorers": []}, "scorers"),
        ({"scorers": ["exact_match", {"name": "regex", "params": {"pattern": "["}}]}, "scorers[1].params.pattern"),
        ({"scorers": [{"name": "judge", "params": {"judge_model": "judge-v0"}}]}, "scorers[0].params.judge_model"),
        ({"concurrency": 0}, "concurrency"),
        ({"max_tokens": 100000}, "max_tokens"),
    ],
)
def test_run_errors_name_the_field(change: dict, field: str, owner, small_suite, versions) -> None:  # type: ignore[no-untyped-def]
    body = {"suite": "small", "model_version": "adder-v1", "scorers": ["exact_match"], **change}
    response = owner.api().post("/api/v1/eval-runs", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not EvalRun.objects.exists()


def test_a_finished_run_cannot_be_cancelled(owner, run: EvalRun) -> None:  # type: ignore[no-untyped-def]
    response = owner.api().post(f"/api/v1/eval-runs/{run.pk}/cancel")
    assert response.status_code == 409 and "state" in response.json()["errors"]


def test_runs_list_results_and_summary(viewer, run: EvalRun) -> None:  # type: ignore[no-untyped-def]
    listed = viewer.api().get("/api/v1/eval-runs?model_version=adder-v1&state=succeeded").json()
    assert [r["id"] for r in listed["results"]] == [run.pk]
    assert viewer.api().get("/api/v1/eval-runs?model_version=adder-v2").json()["results"] == []
    results = viewer.api().get(f"/api/v1/eval-runs/{run.pk}/results").json()["results"]
    assert [r["item_key"] for r in results] == ["a", "b", "c"]
    assert results[0]["scores"]["exact_match"] == {"value": 1.0, "passed": True}
    summary = viewer.api().get(f"/api/v1/eval-runs/{run.pk}").json()["summary"]
    assert summary["scorers"]["exact_match"] == {"name": "exact_match", "n": 3, "mean": 1.0, "pass_rate": 1.0, "errors": 0}


def test_comparison_of_two_runs(viewer, small_suite, versions, finished_run, run: EvalRun) -> None:  # type: ignore[no-untyped-def]
    worse = finished_run(suite=small_suite, version=versions["adder-v2-broken"],
                         answer=lambda item: "0" if item.key != "a" else item.reference)
    response = viewer.api().get(f"/api/v1/eval-comparisons?baseline={run.pk}&candidate={worse.pk}")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["kind"] == "pass_fail" and body["scorer"]["label"] == "exact_match"
    assert body["overall"]["mcnemar"]["baseline_only"] == 2
    assert body["overall"]["difference"] == pytest.approx(-2 / 3)
    assert {row["tag"] for row in body["per_tag"]} == {"carry", "no-carry"}
    assert body["baseline"]["model_version"] == "adder-v1" and body["candidate"]["run_id"] == worse.pk


def test_comparison_errors_name_the_field(viewer, owner, run: EvalRun, versions) -> None:  # type: ignore[no-untyped-def]
    assert "candidate" in viewer.api().get(f"/api/v1/eval-comparisons?baseline={run.pk}").json()["errors"]
    assert "candidate" in viewer.api().get(f"/api/v1/eval-comparisons?baseline={run.pk}&candidate=999").json()["errors"]
    assert "scorer" in viewer.api().get(
        f"/api/v1/eval-comparisons?baseline={run.pk}&candidate={run.pk}&scorer=similarity").json()["errors"]
    other = owner.api().post("/api/v1/eval-suites", {"name": "other", "jsonl": SMALL_SUITE + '{"prompt": "x"}\n'},
                             format="json").json()
    created = owner.api().post("/api/v1/eval-runs", {"suite": other["id"], "model_version": "adder-v1",
                                                    "scorers": ["exact_match"]}, format="json").json()
    response = viewer.api().get(f"/api/v1/eval-comparisons?baseline={run.pk}&candidate={created['id']}")
    assert response.status_code == 400 and "candidate" in response.json()["errors"]


def test_the_schema_documents_the_evals_endpoints(anonymous) -> None:  # type: ignore[no-untyped-def]
    schema = anonymous.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    for path in ("/api/v1/eval-suites", "/api/v1/eval-runs/{run_id}", "/api/v1/eval-comparisons"):
        assert path in schema["paths"]
