"""Uploading suites as JSONL: bad lines reported by number with nothing imported, versions, the built-in suite."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from evals import jsonl
from evals.models import EvalItem, EvalSuite
from evals.services import SuiteUploadError, builtin_suites_ensure, eval_suite_create
from tests.evals.conftest import SMALL_SUITE

BAD = (
    '{"prompt": "1+1=", "reference": "2"}\n'
    "\n"
    "{not json}\n"
    '{"prompt": "2+2=", "messages": [{"role": "user", "content": "2+2"}]}\n'
    '{"messages": [{"role": "robot", "content": "hi"}]}\n'
    '{"prompt": "3+3=", "tags": ["ok", "has space"]}\n'
    '{"prompt": "4+4=", "colour": "red"}\n'
    '{"id": "x", "prompt": "5+5="}\n'
    '{"id": "x", "prompt": "6+6="}\n'
    "[1, 2]\n"
)


def test_every_bad_line_is_reported_by_number_and_nothing_is_imported(db: None) -> None:
    with pytest.raises(SuiteUploadError) as caught:
        eval_suite_create(name="bad", jsonl_data=BAD)
    lines = {error.line: error.reason for error in caught.value.line_errors}
    assert set(lines) == {3, 4, 5, 6, 7, 9, 10}
    assert "not valid JSON" in lines[3]
    assert "exactly one of 'prompt' or 'messages'" in lines[4]
    assert "role must be one of" in lines[5]
    assert "'has space'" in lines[6]
    assert "unknown key 'colour'" in lines[7]
    assert "already used on line 8" in lines[9]
    assert "JSON object" in lines[10]
    body = caught.value.as_dict()
    assert body["errors"]["file"][0].startswith("line 3: not valid JSON")
    assert {"line": 4, "reason": lines[4]} in body["lines"]
    assert not EvalSuite.objects.exists() and not EvalItem.objects.exists()


def test_size_caps_and_empty_uploads_are_refused(db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SuiteUploadError, match="holds no items"):
        eval_suite_create(name="empty", jsonl_data="\n\n")
    monkeypatch.setattr(jsonl, "MAX_BYTES", 100)
    with pytest.raises(SuiteUploadError, match="the limit is 100"):
        eval_suite_create(name="big", jsonl_data=SMALL_SUITE * 3)
    monkeypatch.setattr(jsonl, "MAX_ITEMS", 2)
    monkeypatch.setattr(jsonl, "MAX_BYTES", 10_000)
    with pytest.raises(SuiteUploadError) as caught:
        eval_suite_create(name="many", jsonl_data=SMALL_SUITE)
    assert str(caught.value) == "line 3: more than 2 items"
    with pytest.raises(SuiteUploadError, match="line 2: not UTF-8"):
        eval_suite_create(name="binary", jsonl_data=b'{"prompt": "a"}\n\xff\xfe\n')


def test_a_new_upload_under_a_name_is_its_next_version_and_the_same_upload_is_not(db: None) -> None:
    first = eval_suite_create(name="sums", jsonl_data=SMALL_SUITE)
    assert (first.version, first.item_count) == (1, 3)
    assert first.tags == {"carry": 2, "no-carry": 1}
    assert eval_suite_create(name="sums", jsonl_data=SMALL_SUITE).pk == first.pk
    second = eval_suite_create(name="sums", jsonl_data=SMALL_SUITE + '{"prompt": "1+1=", "reference": "2"}\n')
    assert (second.version, second.item_count) == (2, 4)
    item = EvalItem.objects.get(suite=second, key="c")
    assert item.messages == [{"role": "user", "content": "55+45"}] and item.prompt == ""
    assert EvalItem.objects.get(suite=second, position=3).key == "4"  # no id: its line number


def test_the_builtin_adder_suite_is_the_demo_models_heldout_sums(db: None) -> None:
    from serving.demo_models.data import heldout_sums

    suite = builtin_suites_ensure()[0]
    assert builtin_suites_ensure()[0].pk == suite.pk
    assert suite.name == "adder-heldout" and suite.source == EvalSuite.Source.BUILTIN
    items = list(suite.items.order_by("position"))
    assert [(i.prompt, i.reference) for i in items] == heldout_sums()
    assert suite.tags["carry"] + suite.tags["no-carry"] == 200
    carry = next(i for i in items if "carry" in i.tags)
    a, b = (int(x) for x in carry.prompt[:-1].split("+"))
    assert a % 10 + b % 10 >= 10


def test_api_upload_as_a_multipart_file(owner) -> None:  # type: ignore[no-untyped-def]
    upload = SimpleUploadedFile("suite.jsonl", SMALL_SUITE.encode(), content_type="application/jsonl")
    response = owner.api().post("/api/v1/eval-suites", {"name": "sums", "file": upload}, format="multipart")
    assert response.status_code == 201, response.content
    assert response.json()["item_count"] == 3 and response.json()["label"] == "sums@1"
    again = owner.api().post("/api/v1/eval-suites", {"name": "sums", "jsonl": SMALL_SUITE}, format="json")
    assert again.status_code == 200 and again.json()["id"] == response.json()["id"]


def test_api_upload_as_a_raw_body(owner) -> None:  # type: ignore[no-untyped-def]
    response = owner.api().generic("POST", "/api/v1/eval-suites?name=raw", SMALL_SUITE.encode(),
                                   content_type="application/x-ndjson")
    assert response.status_code == 201, response.content
    assert response.json()["name"] == "raw"


def test_api_upload_errors_name_the_line(owner) -> None:  # type: ignore[no-untyped-def]
    upload = SimpleUploadedFile("suite.jsonl", BAD.encode())
    response = owner.api().post("/api/v1/eval-suites", {"name": "bad", "file": upload}, format="multipart")
    assert response.status_code == 400
    body = response.json()
    assert body["errors"]["file"][0] == "line 3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    assert [entry["line"] for entry in body["lines"]] == [3, 4, 5, 6, 7, 9, 10]
    assert not EvalSuite.objects.exists()


def test_api_upload_needs_a_name_and_one_body(owner) -> None:  # type: ignore[no-untyped-def]
    response = owner.api().post("/api/v1/eval-suites", {"jsonl": SMALL_SUITE}, format="json")
    assert response.status_code == 400 and "name" in response.json()["errors"]
    response = owner.api().post("/api/v1/eval-suites", {"name": "x"}, format="json")
    assert response.status_code == 400 and "file" in response.json()["errors"]
    response = owner.api().post("/api/v1/eval-suites", {"name": "bad name!", "jsonl": SMALL_SUITE}, format="json")
    assert response.status_code == 400 and "name" in response.json()["errors"]


def test_api_suite_detail_and_items(owner, viewer) -> None:  # type: ignore[no-untyped-def]
    suite = eval_suite_create(name="sums", jsonl_data=SMALL_SUITE)
    detail = viewer.api().get(f"/api/v1/eval-suites/{suite.pk}")
    assert detail.status_code == 200 and detail.json()["tags"] == {"carry": 2, "no-carry": 1}
    items = viewer.api().get(f"/api/v1/eval-suites/{suite.pk}/items?tag=carry").json()
    assert [item["key"] for item in items["results"]] == ["b", "c"]
    listed = viewer.api().get("/api/v1/eval-suites?latest=true").json()
    assert [s["label"] for s in listed["results"]] == ["sums@1"]
    assert viewer.api().get("/api/v1/eval-suites/999999").status_code == 404
    assert json.loads(json.dumps(detail.json()))
