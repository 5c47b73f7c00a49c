"""The audit trail is append-only from every side a person or a program can reach it: no REST route and no
admin page changes or deletes an event, an approval or an analysis look, no app code rewrites one, and a
rollout cannot be deleted out from under its events.

The model-level refusal (save/delete/update on RolloutEvent) is tested in
tests/rollouts/test_rollout_state_machine.py::test_events_are_append_only; this covers what sits around it."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import DatabaseError, IntegrityError, connection, models, transaction
from django.db.models import ProtectedError
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from drf_spectacular.generators import SchemaGenerator

from rollouts.analysis import rollout_analyse
from rollouts.models import Notification, Rollout, RolloutAnalysis, RolloutApproval, RolloutEvent
from rollouts.services import rollout_approve, rollout_create, rollout_start
from tests.conftest import Member
from tests.rollouts.helpers import canary_plan, version
from tests.support.processes import REPO_ROOT

pytestmark = pytest.mark.django_db

AUDIT_MODELS: tuple[type[models.Model], ...] = (RolloutEvent, RolloutApproval, RolloutAnalysis)
WRITE_METHODS = {"put", "patch", "delete"}
ADMIN_PASSWORD = "superuser-audit-password-1"


# --- what is on the record ------------------------------------------------------------------------


def snapshot() -> dict[str, list[dict[str, Any]]]:
    """Every row of every audit model and of the rollouts, as plain values: equal before and after means
    nothing was changed, added or taken away."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for model in (*AUDIT_MODELS, Rollout, Notification):
        tables[model.__name__] = list(model.objects.order_by("pk").values())
    return tables


@pytest.fixture
def audited_rollout(owner: Member, approver: Member) -> Rollout:
    """A rollout with each kind of audit row: events (created, awaiting approval, approved), an approval,
    and one analysis look (a hold)."""
    version("adder-v1")
    version("adder-v2")
    plan = canary_plan(steps=[
        {"weight": 0.1, "min_duration_s": 3600, "requires_approval": True},
        {"weight": 0.5, "min_duration_s": 3600},
    ])  # fmt: skip
    rollout = rollout_create(plan=plan, actor=owner.user).rollout
    rollout_start(rollout=rollout, actor=owner.user)
    rollout_approve(rollout=rollout, actor=approver.user, reason="on call agrees")
    look = rollout_analyse(rollout_id=rollout.pk)
    assert look is not None and look.decision == RolloutAnalysis.Decision.HOLD, look
    rollout.refresh_from_db()
    assert rollout.events.count() >= 3 and rollout.approvals.count() == 1 and rollout.analyses.count() == 1
    return rollout


@pytest.fixture
def superuser_client(db: None) -> Client:
    """The Django admin's most powerful user, logged in through the login form as a person would."""
    get_user_model().objects.create_superuser(username="root", email="root@example.test", password=ADMIN_PASSWORD)
    client = Client()
    response = client.post("/admin/login/?next=/admin/", {"username": "root", "password": ADMIN_PASSWORD})
    assert response.status_code == 302 and response["Location"] == "/admin/", response.status_code
    return client


# --- (a) the REST API -----------------------------------------------------------------------------


def _patterns(resolver: URLResolver, prefix: str = "") -> Iterator[tuple[str, URLPattern]]:
    for entry in resolver.url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            yield from _patterns(entry, route)
        else:
            yield route, entry


def test_no_api_view_on_a_rollout_path_has_a_handler_that_writes_in_place() -> None:
    """Walks the URLconf itself, so a view left out of the OpenAPI schema is caught too."""
    rollout_routes = [(route, entry) for route, entry in _patterns(get_resolver())
                      if route.startswith("api/v1/rollouts")]  # fmt: skip
    assert any(route.endswith("/events") for route, _ in rollout_routes), [route for route, _ in rollout_routes]
    offenders = []
    for route, entry in rollout_routes:
        view_class = getattr(entry.callback, "view_class", None)
        assert view_class is not None, f"{route}: not a class-based API view; check its methods by hand"
        offenders += [f"{method.upper()} {route}" for method in WRITE_METHODS if hasattr(view_class, method)]
    assert offenders == []


def test_the_openapi_schema_offers_no_put_patch_or_delete_on_rollouts_or_their_events() -> None:
    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    events_paths = [path for path in paths if path.startswith("/api/v1/rollouts") and path.endswith("/events")]
    assert events_paths == ["/api/v1/rollouts/{rollout_id}/events"]
    assert set(paths[events_paths[0]]) == {"get"}
    offered = [f"{method.upper()} {path}" for path, operations in paths.items() if path.startswith("/api/v1/rollouts")
               for method in operations if method in WRITE_METHODS]  # fmt: skip
    assert offered == []


@pytest.mark.parametrize(
    ("method", "suffix"),
    [(method, "/events") for method in ("delete", "patch", "put", "post")] + [(method, "") for method in ("delete", "patch", "put")],
)
def test_writing_to_a_rollout_or_its_events_as_platform_admin_is_405_and_changes_nothing(
    method: str, suffix: str, audited_rollout: Rollout, platform_admin: Member
) -> None:
    before = snapshot()
    body = {"reason": "rewritten", "kind": "promoted", "actor": "mallory", "events": []}
    response = getattr(platform_admin.api(), method)(
        f"/api/v1/rollouts/{audited_rollout.pk}{suffix}", body, format="json"
    )
    assert response.status_code == 405, (response.status_code, response.content[:300])
    assert snapshot() == before


def test_an_event_id_in_the_path_is_not_a_route_either(audited_rollout: Rollout, platform_admin: Member) -> None:
    event = audited_rollout.events.order_by("seq").first()
    assert event is not None
    before = snapshot()
    for method in ("delete", "patch", "put", "get"):
        response = getattr(platform_admin.api(), method)(
            f"/api/v1/rollouts/{audited_rollout.pk}/events/{event.pk}", {"reason": "x"}, format="json"
        )
        assert response.status_code == 404, (method, response.status_code)
    assert snapshot() == before


def test_the_html_pages_offer_no_delete_either(audited_rollout: Rollout, superuser_client: Client) -> None:
    """The rollout page's action view takes a slug: 'delete' is not one of its actions; the audit log is
    read-only."""
    before = snapshot()
    pk = audited_rollout.pk
    assert superuser_client.post(f"/rollouts/{pk}/delete").status_code == 404
    assert superuser_client.post(f"/rollouts/{pk}/history", {"reason": "x"}).status_code == 405
    assert superuser_client.post("/audit", {"rollout": str(pk)}).status_code == 405
    assert superuser_client.delete(f"/rollouts/{pk}").status_code == 405
    assert snapshot() == before


# --- (b) the Django admin ---------------------------------------------------------------------------


def _admin_url(model: type[models.Model], *parts: object) -> str:
    tail = "".join(f"{part}/" for part in parts)
    return f"/admin/{model._meta.app_label}/{model._meta.model_name}/{tail}"


AUDIT_ADMIN_MODELS = [RolloutEvent, RolloutApproval, RolloutAnalysis, Rollout]


@pytest.mark.parametrize("model", AUDIT_ADMIN_MODELS, ids=lambda model: model.__name__)
def test_the_admin_shows_audit_rows_to_a_superuser_but_will_not_change_add_or_delete_them(
    model: type[models.Model], audited_rollout: Rollout, superuser_client: Client
) -> None:
    row = model.objects.filter(**({"pk": audited_rollout.pk} if model is Rollout else {"rollout": audited_rollout}))
    obj = row.order_by("pk").first()
    assert obj is not None
    before = snapshot()

    # Viewing works: the superuser really is allowed in, so the refusals below are about writing.
    listing = superuser_client.get(_admin_url(model))
    assert listing.status_code == 200
    page = superuser_client.get(_admin_url(model, obj.pk, "change"))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content and b"deletelink" not in page.content

    form = {field.name: "rewritten" for field in model._meta.concrete_fields if not field.primary_key}
    assert superuser_client.post(_admin_url(model, obj.pk, "change"), form).status_code == 403
    assert superuser_client.get(_admin_url(model, obj.pk, "delete")).status_code == 403
    assert superuser_client.post(_admin_url(model, obj.pk, "delete"), {"post": "yes"}).status_code == 403
    assert superuser_client.get(_admin_url(model, "add")).status_code == 403
    assert superuser_client.post(_admin_url(model, "add"), form).status_code == 403

    # The bulk action is not offered, and posting it anyway deletes nothing.
    assert b"delete_selected" not in listing.content
    all_pks = [str(pk) for pk in model.objects.values_list("pk", flat=True)]
    bulk = superuser_client.post(
        _admin_url(model), {"action": "delete_selected", "_selected_action": all_pks, "post": "yes", "index": "0"}
    )
    assert bulk.status_code in (200, 302)

    assert snapshot() == before


# --- (c) the code and the schema ----------------------------------------------------------------------

# Names through which code reaches audit rows: the models, their reverse relations on Rollout, and the
# selectors that return them.
AUDIT_ROOTS = {model.__name__ for model in AUDIT_MODELS}
AUDIT_RELATED = {"events", "approvals", "analyses"}
AUDIT_SELECTORS = {"rollout_events", "rollout_series", "rollout_approvals", "rollout_approval_get", "rollout_latest_analysis"}
REWRITES = {"update", "delete", "bulk_update", "update_or_create", "_raw_delete", "save"}
AUDIT_TABLES = "|".join(f"rollouts_{model.__name__.lower()}" for model in AUDIT_MODELS)
RAW_REWRITE = re.compile(rf"\b(update\s+\"?({AUDIT_TABLES})|delete\s+from\s+\"?({AUDIT_TABLES})|truncate\b[^;]*({AUDIT_TABLES}))",
                         re.IGNORECASE)  # fmt: skip
APP_SOURCES = ("config", "accounts", "serving", "experiments", "rollouts", "evals", "rolloutctl", "scripts", "benchmarks")


MANAGERS = {"objects", "_default_manager", "_base_manager"}


def _reaches_audit_rows(node: ast.AST, bound: set[str]) -> bool:
    """Does this expression (`RolloutEvent.objects.filter(...)`, `rollout.events.all()`, `event`, ...)
    stand for stored audit rows? `RolloutEvent(...)` is a new row, and `RolloutEvent.Kind` no row at all."""
    through_manager = False
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name | ast.Attribute) and _called_name(node.func) in AUDIT_SELECTORS:
                return True
            node = node.func
        elif isinstance(node, ast.Attribute):
            if node.attr in AUDIT_RELATED:
                return True
            through_manager = through_manager or node.attr in MANAGERS
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Name):
            return (node.id in AUDIT_ROOTS and through_manager) or node.id in bound
        else:
            return False


def _called_name(func: ast.Name | ast.Attribute) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr


def _target_names(target: ast.expr) -> Iterator[str]:
    """The names an assignment or a loop binds (`a`, `a, b`, `*rest`), not `obj.attr = ...`."""
    if isinstance(target, ast.Name):
        yield target.id
    elif isinstance(target, ast.Tuple | ast.List):
        for element in target.elts:
            yield from _target_names(element)
    elif isinstance(target, ast.Starred):
        yield from _target_names(target.value)


def _bound_names(tree: ast.AST) -> set[str]:
    """Names that hold audit rows somewhere in the module: `event = RolloutEvent.objects.get(...)`,
    `for look in rollout.analyses.all():`. Coarse (module-wide), which can only add findings."""
    bound: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign) and _reaches_audit_rows(node.value, bound):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None and _reaches_audit_rows(node.value, bound):
                targets = [node.target]
            elif isinstance(node, ast.For | ast.comprehension) and _reaches_audit_rows(node.iter, bound):
                targets = [node.target]
            for name in (name for target in targets for name in _target_names(target)):
                if name not in bound:
                    bound.add(name)
                    changed = True
    return bound


def audit_calls(source: str, filename: str) -> list[tuple[int, str, str]]:
    """(line, method, receiver) of every method call on audit rows in `source`."""
    tree = ast.parse(source, filename)
    bound = _bound_names(tree)
    return sorted(
        (node.lineno, node.func.attr, ast.unparse(node.func.value)) for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _reaches_audit_rows(node.func.value, bound)
    )  # fmt: skip


def audit_rewrites(source: str, filename: str) -> list[str]:
    """Every place in `source` that updates or deletes audit rows, or saves one it loaded."""
    found = [(line, f"{filename}:{line}: .{method}() on {receiver}")
             for line, method, receiver in audit_calls(source, filename) if method in REWRITES]  # fmt: skip
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and RAW_REWRITE.search(node.value):
            found.append((node.lineno, f"{filename}:{node.lineno}: raw SQL rewriting an audit table"))
    return [text for _, text in sorted(found)]


def _app_sources() -> Iterator[Path]:
    for top in APP_SOURCES:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            if "migrations" not in path.parts:
                yield path


def test_the_scanner_finds_each_kind_of_rewrite() -> None:
    """The check below is only as good as this: each way of rewriting the trail, written out, is caught."""
    bad = '''
RolloutEvent.objects.filter(rollout=r).update(reason="x")
RolloutEvent.objects.all().delete()
RolloutEvent._base_manager.filter(pk=1).delete()
rollout.events.filter(kind="started").update(actor="someone")
RolloutApproval.objects.filter(pk=1).delete()
event = RolloutEvent.objects.get(pk=1)
event.save()
for look in rollout.analyses.all():
    look.delete()
for e in selectors.rollout_events(rollout=r):
    e.save(update_fields=["reason"])
RolloutEvent.objects.bulk_update(events, ["reason"])
cursor.execute("UPDATE rollouts_rolloutevent SET reason = %s", ["x"])
cursor.execute('DELETE FROM "rollouts_rolloutapproval" WHERE id = 1')
'''
    found = audit_rewrites(bad, "bad.py")
    assert [line.split(":")[1] for line in found] == [str(n) for n in (2, 3, 4, 5, 6, 8, 10, 12, 13, 14, 15)], found
    fine = '''
RolloutEvent.objects.create(rollout=r, seq=1)
new = RolloutEvent(rollout=r, seq=2)
new.save()
Kind = RolloutEvent.Kind
rollout.state = Kind.STARTED
Rollout.objects.filter(pk=1).update(state="running")
rollout.save(update_fields=["state"])
RolloutEvent.objects.select_for_update().filter(rollout=r)
counts.update(other)
'''
    assert audit_rewrites(fine, "fine.py") == []


# The one deletion of looks the app makes: the compaction of an ended rollout's holds to one a minute, which
# keeps every decision (tests/rollouts/test_retention.py). Events and approvals have no exception.
LOOK_COMPACTION = ("rollouts/retention.py",)


def test_no_app_code_updates_or_deletes_audit_rows() -> None:
    sources = list(_app_sources())
    assert any(path.name == "services.py" and path.parent.name == "rollouts" for path in sources)
    found, creates = [], []
    for path in sources:
        name = str(path.relative_to(REPO_ROOT))
        source = path.read_text()
        if name == LOOK_COMPACTION[0]:
            # Looks may be deleted there, nothing else rewritten, and events and approvals not touched at all.
            assert "RolloutEvent" not in source and "RolloutApproval" not in source, name
            assert {method for _, method, _ in audit_calls(source, name) if method in REWRITES} == {"delete"}, name
            continue
        found += audit_rewrites(source, name)
        creates += [f"{name}:{line}" for line, method, _ in audit_calls(path.read_text(), name) if method == "create"]
    assert found == []
    # The scanner does see the trail being written where it is written (events, approvals, looks).
    assert len(creates) >= 3, creates


def test_the_audit_rows_refer_to_what_they_record_with_protect() -> None:
    """CASCADE would delete an event with its rollout or its actor; SET_NULL would rewrite it."""
    weak = []
    for model in (RolloutEvent, RolloutApproval):
        for field in model._meta.get_fields():
            if isinstance(field, models.ForeignKey) and field.remote_field.on_delete is not models.PROTECT:
                weak.append(f"{model.__name__}.{field.name}: {field.remote_field.on_delete.__name__}")
    assert weak == []


def test_a_rollout_with_a_trail_cannot_be_deleted_through_the_orm(audited_rollout: Rollout) -> None:
    before = snapshot()
    with pytest.raises(ProtectedError):
        Rollout.objects.filter(pk=audited_rollout.pk).delete()
    with pytest.raises(ProtectedError):
        audited_rollout.delete()
    assert snapshot() == before


def test_the_database_refuses_to_delete_a_rollout_under_its_events(audited_rollout: Rollout) -> None:
    """Below the ORM: the foreign key itself (SQLite with foreign_keys=ON, PostgreSQL) keeps the events'
    rollout (a raw DELETE of the events themselves is the trigger's, below)."""
    before = snapshot()
    table, rollout_table = RolloutEvent._meta.db_table, Rollout._meta.db_table
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        # Analyses cascade in the ORM only; the database would refuse them too, so clear them in this
        # (rolled back) transaction to reach the events' own constraint.
        cursor.execute(f"DELETE FROM {RolloutAnalysis._meta.db_table} WHERE rollout_id = %s", [audited_rollout.pk])
        cursor.execute(f"DELETE FROM {rollout_table} WHERE id = %s", [audited_rollout.pk])
        connection.check_constraints(table_names=[table, RolloutApproval._meta.db_table])
    assert snapshot() == before


@pytest.mark.skipif(connection.vendor != "postgresql", reason="the trigger is PostgreSQL's (SQLite: the models refuse)")
@pytest.mark.parametrize("statement", [
    "UPDATE {events} SET reason = 'rewritten'",
    "DELETE FROM {events}",
    "UPDATE {approvals} SET reason = 'rewritten'",
    "DELETE FROM {approvals}",
])  # fmt: skip
def test_postgresql_refuses_raw_sql_that_rewrites_the_trail(statement: str, audited_rollout: Rollout) -> None:
    assert RolloutEvent.objects.filter(rollout=audited_rollout).exists()
    assert RolloutApproval.objects.filter(rollout=audited_rollout).exists()
    before = snapshot()
    sql = statement.format(events=RolloutEvent._meta.db_table, approvals=RolloutApproval._meta.db_table)
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql)
    assert snapshot() == before
