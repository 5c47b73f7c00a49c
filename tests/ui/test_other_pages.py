"""Pages of evals, serving and experiments with Django's test client."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from evals.models import EvalItem, EvalRun, EvalSuite
from evals.scorers import ScoreInput, scorer_build
from evals.services import (
    ItemOutcome,
    eval_run_checkpoint,
    eval_run_claim,
    eval_run_create,
    eval_run_finish,
    eval_suite_create,
)
from rollouts.analysis import rollout_analyse
from rollouts.models import Rollout
from rollouts.services import rollout_create
from serving.models import EngineWorker, ModelVersion
from tests.rollouts.helpers import both_arms, step_back
from tests.ui.conftest import logged_in

pytestmark = pytest.mark.django_db

SUITE = (
    '{"id": "a", "prompt": "12+30=", "reference": "42", "tags": ["no-carry"]}\n'
    '{"id": "b", "prompt": "19+23=", "reference": "42", "tags": ["carry"]}\n'
    '{"id": "c", "prompt": "55+45=", "reference": "100", "tags": ["carry"]}\n'
)


def jsonl(name: str, text: str) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, text.encode(), content_type="application/jsonl")


def finished(suite: EvalSuite, version: ModelVersion, answer: Callable[[EvalItem], str]) -> EvalRun:
    run = eval_run_create(suite=suite, model_version=version, scorers=["exact_match"])
    token = eval_run_claim(run_id=run.pk)
    assert token
    scorer = scorer_build(run.scorers[0])
    outcomes = []
    for item in suite.items.order_by("position"):
        output = answer(item)
        case = ScoreInput(output=output, reference=item.reference, prompt=item.prompt)
        outcomes.append(
            ItemOutcome(item_id=item.pk, output=output, scores={"exact_match": scorer(case).as_dict()})
        )
    eval_run_checkpoint(run_id=run.pk, token=token, outcomes=outcomes)
    eval_run_finish(run_id=run.pk, token=token, state=EvalRun.State.SUCCEEDED)
    run.refresh_from_db()
    return run


# --- evals ----------------------------------------------------------------------------------------------


def test_an_upload_with_bad_lines_lists_each_line_and_stores_nothing(owner: Any) -> None:
    bad = '{"id": "a", "prompt": "1+1=", "reference": "2"}\nnot json\n{"id": "a", "prompt": "2+2="}\n{"reference": "3"}\n'
    response = logged_in(owner).post(
        reverse("eval-suite-list"), {"name": "sums", "file": jsonl("sums.jsonl", bad)}
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "Nothing was stored." in html
    lines = re.findall(r"<strong>line (\d+)</strong>: ([^<]+)</li>", html)
    assert [int(n) for n, _ in lines] == [2, 3, 4]
    assert "give exactly one of &#x27;prompt&#x27; or &#x27;messages&#x27;" in lines[2][1]
    assert not EvalSuite.objects.filter(name="sums").exists()


def test_a_good_upload_goes_to_its_suite_page(owner: Any) -> None:
    client = logged_in(owner)
    response = client.post(
        reverse("eval-suite-list"),
        {"name": "sums", "description": "three sums", "file": jsonl("s.jsonl", SUITE)},
    )
    suite = EvalSuite.objects.get(name="sums")
    assert response.status_code == 302 and response["Location"] == reverse(
        "eval-suite-detail", args=[suite.pk]
    )
    page = client.get(response["Location"]).content.decode()
    assert "sums@1" in page and "carry 2" in page and "no-carry 1" in page and "12+30=" in page
    assert "Run this suite" in page


def test_a_viewer_cannot_upload_or_start_runs_and_a_forged_upload_is_refused(
    viewer: Any, owner: Any, versions: None
) -> None:
    client = logged_in(viewer)
    assert "Upload a suite" not in client.get(reverse("eval-suite-list")).content.decode()
    assert (
        client.post(reverse("eval-suite-list"), {"name": "x", "file": jsonl("x.jsonl", SUITE)}).status_code
        == 403
    )
    suite = eval_suite_create(name="sums", jsonl_data=SUITE)
    version = ModelVersion.objects.get(name="adder", version="v1")
    assert (
        client.post(
            reverse("eval-run-start", args=[suite.pk]), {"model_version": version.pk, "scorer": "exact_match"}
        ).status_code
        == 403
    )
    forged = logged_in(owner, enforce_csrf_checks=True).post(
        reverse("eval-suite-list"), {"name": "forged", "file": jsonl("f.jsonl", SUITE)}
    )
    assert forged.status_code == 403
    assert not EvalSuite.objects.filter(name__in=["x", "forged"]).exists() and not EvalRun.objects.exists()


def test_a_release_manager_starts_and_cancels_a_run_and_watches_its_progress(
    owner: Any, versions: None
) -> None:
    suite = eval_suite_create(name="sums", jsonl_data=SUITE)
    version = ModelVersion.objects.get(name="adder", version="v1")
    client = logged_in(owner)
    response = client.post(
        reverse("eval-run-start", args=[suite.pk]),
        {"model_version": version.pk, "scorer": "exact_match", "max_tokens": 8},
    )
    run = EvalRun.objects.get()
    assert response.status_code == 302 and (run.suite_id, run.model_version_id, run.max_tokens) == (
        suite.pk,
        version.pk,
        8,
    )
    live = client.get(reverse("eval-run-detail-live", args=[run.pk])).content.decode()
    assert "0 of 3 items (0 %)" in live and 'id="cancel-run"' in live
    digest = re.search(r'data-live-digest="(\w+)"', live)
    assert digest is not None
    assert (
        client.get(reverse("eval-run-detail-live", args=[run.pk]), {"h": digest.group(1)}).status_code == 204
    )
    client.post(reverse("eval-run-cancel", args=[run.pk]))
    run.refresh_from_db()
    assert run.state == "cancelled"
    assert (
        "cancelled"
        in client.get(reverse("eval-run-detail-live", args=[run.pk]), {"h": digest.group(1)}).content.decode()
    )


def test_the_comparison_page_has_a_per_tag_table(viewer: Any, versions: None) -> None:
    suite = eval_suite_create(name="sums", jsonl_data=SUITE)
    v1, v2 = ModelVersion.objects.get(version="v1"), ModelVersion.objects.get(version="v2")
    right = finished(suite, v1, lambda item: item.reference or "")
    carries_wrong = finished(suite, v2, lambda item: "0" if "carry" in item.tags else item.reference or "")
    html = (
        logged_in(viewer)
        .get(reverse("eval-compare"), {"baseline": right.pk, "candidate": carries_wrong.pk})
        .content.decode()
    )
    rows = re.findall(
        r'<th scope="row" data-label="\w+">([\w-]+)</th><td data-label="n">(\d+)</td><td data-label="Baseline">([\d.]+)</td><td data-label="Candidate">([\d.]+)</td>',
        html,
    )
    assert rows == [
        ("all", "3", "1.000", "0.333"),
        ("carry", "2", "1.000", "0.000"),
        ("no-carry", "1", "1.000", "1.000"),
    ]
    assert "only the baseline on 2" in html
    # Runs of different suites cannot be compared: said, not a 500.
    other = finished(
        eval_suite_create(name="other", jsonl_data=SUITE.replace("12+30", "10+30")), v2, lambda item: ""
    )
    refused = logged_in(viewer).get(reverse("eval-compare"), {"baseline": right.pk, "candidate": other.pk})
    assert refused.status_code == 400 and "not on the same suite version" in refused.content.decode()


# --- serving --------------------------------------------------------------------------------------------


def test_the_engine_page_shows_state_health_restarts_logs_and_metrics(
    viewer: Any, engine_with_metrics: EngineWorker
) -> None:
    client = logged_in(viewer)
    html = client.get(reverse("engine-detail", args=[engine_with_metrics.pk])).content.decode()
    assert "ready" in html and "ok" in html
    assert "<dt>Restarts</dt><dd>2" in html
    assert "Uvicorn running on http://127.0.0.1:8101" in html
    assert "25.0 %" in html  # KV cache
    ttft = re.search(
        r"<th scope=\"row\">Time to first token</th><td>100</td><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td>",
        html,
    )
    # p50: 50 of 100 falls in the (10 ms, 50 ms] bucket holding requests 11 to 60: 10 + 40 x 0.8 = 42 ms.
    assert ttft is not None and ttft.groups() == ("50 ms", "42 ms", "99 ms")
    listing = client.get(reverse("engine-list")).content.decode()
    assert "3 running, 1 waiting" in listing
    assert "serving pod" not in html  # a local engine is one process


def test_a_kubernetes_engine_page_says_its_figures_add_up_its_pods(
    viewer: Any, engine_with_metrics: EngineWorker
) -> None:
    EngineWorker.objects.filter(pk=engine_with_metrics.pk).update(
        metrics={**engine_with_metrics.metrics, "replicas_scraped": 3}
    )
    html = logged_in(viewer).get(reverse("engine-detail", args=[engine_with_metrics.pk])).content.decode()
    assert "added up over its 3 serving pods (KV cache: their mean)" in html


def test_the_model_version_page_shows_lineage_engines_and_loads_eval_history(
    viewer: Any, versions: None
) -> None:
    version = ModelVersion.objects.get(version="v2")
    client = logged_in(viewer)
    html = client.get(reverse("model-version-detail", args=[version.pk])).content.decode()
    assert version.lineage_hash in html and "Hub id" in html
    assert f'hx-get="{reverse("eval-history", args=[version.pk])}"' in html
    suite = eval_suite_create(name="sums", jsonl_data=SUITE)
    run = finished(suite, version, lambda item: item.reference or "")
    history = client.get(reverse("eval-history", args=[version.pk])).content.decode()
    assert f"#{run.pk}" in history and "sums@1" in history and "succeeded" in history


# --- experiments ----------------------------------------------------------------------------------------


def test_an_ab_test_shows_the_intervals_the_decision_used(owner: Any, viewer: Any, versions: None) -> None:
    plan = {
        "alias": "adder", "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "ab",
        "ab": {"weight": 0.5, "min_duration_s": 60},
        "primary_metric": {"metric": "tpot_mean_ms"}, "guardrails": [{"metric": "error_rate", "margin": 0.02}],
    }  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user, start=True).rollout
    step_back(rollout, 30)
    both_arms(rollout, total=400, weight=0.5, seed=21, tpot=(20.0, 2.0), candidate_tpot=(18.0, 2.0))
    look = rollout_analyse(rollout_id=rollout.pk)
    assert look is not None
    primary = next(c for c in look.checks if c["type"] == "primary")
    client = logged_in(viewer)
    listing = client.get(reverse("experiment-list")).content.decode()
    assert f'href="{reverse("experiment-detail", args=[rollout.pk])}"' in listing and "tpot_mean_ms" in listing
    html = client.get(reverse("experiment-detail", args=[rollout.pk])).content.decode()
    # The primary check's row, read from the stored look: the estimate and the interval the decision used.
    # Two checks share alpha: the primary and the guardrail; the guardrail's check on the bake alone (A/B bakes
    # too) takes half of its breach side, no share (three checks when it did).
    row = html[html.index("primary: tpot_mean_ms") :]
    row = row[: row.index("</tr>")]
    effect = re.search(r'data-label="Estimate"><strong class="num">([-+\d.]+)\xa0%', row)
    assert effect is not None and -12.0 < float(effect.group(1)) < -8.0  # about 10 % faster
    assert round(float(effect.group(1)), 1) == round(primary["effect"] * 100, 1) and "win" in row
    assert f"\u03b1 {primary['alpha']:.3g}" in row and "split equally over 2 checks (Bonferroni)" in html
    # Metrics no check decides on are reported beside, with their chance to be better.
    other = html[html.index("<strong>tpot_gmean_ms</strong>") :]
    other = other[: other.index("</tr>")]
    chance = re.search(r'data-label="Chance better">.*?</div> ([\d.]+) %</td>', other)
    assert chance is not None and float(chance.group(1)) > 99 and "better" in other
    assert Rollout.objects.get(pk=rollout.pk).state in ("running", "promoted")


def test_the_experiments_list_reads_every_rollout_s_latest_look_at_once(owner: Any, viewer: Any, versions: None) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tests.rollouts.helpers import version

    plan = {
        "baseline": "adder-v1", "candidate": "adder-v2", "strategy": "ab",
        "ab": {"weight": 0.5, "min_duration_s": 60}, "primary_metric": {"metric": "tpot_mean_ms"},
    }  # fmt: skip
    rollout = rollout_create(plan={**plan, "alias": "adder"}, actor=owner.user, start=True).rollout
    step_back(rollout, 30)
    both_arms(rollout, total=400, weight=0.5, seed=22, tpot=(20.0, 2.0), candidate_tpot=(18.0, 2.0))
    look = rollout_analyse(rollout_id=rollout.pk)
    assert look is not None
    primary = next(c for c in look.checks if c["type"] == "primary")
    client = logged_in(viewer)

    def listing() -> tuple[str, int]:
        with CaptureQueriesContext(connection) as queries:
            html = client.get(reverse("experiment-list")).content.decode()
        return html, sum("rollouts_rolloutanalysis" in q["sql"] for q in queries.captured_queries)

    html, reads = listing()
    row = html[html.index(f'href="{reverse("experiment-detail", args=[rollout.pk])}"') :]
    row = row[: row.index("</tr>")]
    assert primary["decision"] in row and "tpot_mean_ms" in row
    for name in ("chat", "sums"):  # more A/B tests, without looks yet: the page reads the looks no more often
        version(f"{name}-v1")
        version(f"{name}-v2")
        rollout_create(plan={**plan, "alias": name, "baseline": f"{name}-v1", "candidate": f"{name}-v2"},
                       actor=owner.user, start=True)  # fmt: skip
    html, more = listing()
    assert more == reads <= 2 and html.count('href="/experiments/') == 3
