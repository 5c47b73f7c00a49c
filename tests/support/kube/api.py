"""The stand-in Kubernetes API server's REST side: a store of objects and the HTTP protocol over it.

It speaks the real protocol over real HTTP, as lightkube (or kubectl) expects it: resources under
`/api/v1` and `/apis/<group>/<version>`, namespaced paths, create (POST), get and list (GET, with
`labelSelector` and `fieldSelector`), replace (PUT, with resourceVersion conflicts), patch (JSON merge
patch, strategic merge treated as a merge, JSON patch), delete (graceful for pods), `watch=true` streams
of newline-delimited events from a resourceVersion, pod logs, and `Status` objects for errors (404
NotFound, 409 AlreadyExists / Conflict, 422 Invalid).

Every object a client sends is checked against the Kubernetes OpenAPI schema with `kubernetes-validate`
(strict: unknown fields are errors); a failure is answered 422 and kept in `Store.rejected`, which the
tests assert is empty. The controllers' own writes (status, as the kubelet and controllers write it) are
checked the same way and raise at once."""

from __future__ import annotations

import copy
import json
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import kubernetes_validate

SCHEMA_VERSION = kubernetes_validate.latest_version()


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES = (
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "services", "Service"),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "nodes", "Node", namespaced=False),
    Resource("apps", "v1", "deployments", "Deployment"),
    Resource("apps", "v1", "replicasets", "ReplicaSet"),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
)
BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
BY_KIND = {r.kind: r for r in RESOURCES}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def random_suffix(n: int = 5) -> str:
    # The alphabet Kubernetes' name generator uses (no vowels, no look-alikes).
    return "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(n))


class ApiFailure(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


class SchemaViolation(AssertionError):
    pass


def validate(obj: dict[str, Any]) -> str | None:
    """None if `obj` is valid for its kind, else the validator's message."""
    try:
        kubernetes_validate.validate(obj, SCHEMA_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc).split("\n\n", 1)[0] + " (at " + "/".join(str(p) for p in exc.path) + ")"
    return None


# --- label and field selectors -------------------------------------------------------------------

_REQUIREMENT = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w./-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def selector_match(selector: str, labels: dict[str, str]) -> bool:
    for requirement in _split_selector(selector):
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise ApiFailure(400, "BadRequest", f"unable to parse requirement: {requirement!r}")
        negate, key, op, value, set_op, values = match.groups()
        if op in ("=", "=="):
            ok = labels.get(key) == value
        elif op == "!=":
            ok = labels.get(key) != value
        elif set_op:
            members = {v.strip() for v in values.split(",") if v.strip()}
            ok = labels.get(key) in members if set_op == "in" else labels.get(key) not in members
        else:
            ok = (key in labels) != bool(negate)
        if not ok:
            return False
    return True


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return str(value)


def field_match(selector: str, obj: dict[str, Any]) -> bool:
    for requirement in filter(None, (r.strip() for r in selector.split(","))):
        key, op, value = re.split(r"(!=|==|=)", requirement, maxsplit=1)
        equal = _field(obj, key.strip()) == value.strip()
        if equal != (op != "!="):
            return False
    return True


# --- patches ----------------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902: add, remove, replace, test."""
    doc = copy.deepcopy(target)
    for op in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        kind = op["op"]
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op["value"]:
                raise ApiFailure(422, "Invalid", f"test operation failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                index = len(parent) if last == "-" else int(last)
                parent[index : index + (kind == "replace")] = [op["value"]]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                del parent[last]
        else:
            raise ApiFailure(400, "BadRequest", f"unsupported JSON patch op {kind!r}")
    return doc


# --- the store --------------------------------------------------------------------------------------


Key = tuple[str, str, str]  # (kind, namespace, name)


class Store:
    """Objects by kind, namespace and name, each write with a new resourceVersion and a watch event."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.objects: dict[Key, dict[str, Any]] = {}
        self.rv = 100
        self.events: deque[tuple[int, str, dict[str, Any]]] = deque(maxlen=20000)
        # What clients sent that the schema refused, and every request (method, path), for the tests.
        self.rejected: list[str] = []
        # (method, path, a watch?) of every request.
        self.requests: list[tuple[str, str, bool]] = []
        self.received: list[dict[str, Any]] = []
        self._valid_cache: set[str] = set()
        # The bearer token a client must send (a service account's); anything else is 401.
        self.token = uuid.uuid4().hex

    def _bump(self, obj: dict[str, Any], event: str) -> dict[str, Any]:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, event, copy.deepcopy(obj)))
        self.changed.notify_all()
        return obj

    def _check(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, sort_keys=True)
        if text in self._valid_cache:
            return
        problem = validate(obj)
        if problem is not None:
            raise SchemaViolation(f"the stand-in wrote an invalid {obj.get('kind')}: {problem}")
        self._valid_cache.add(text)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            found = self.objects.get((kind, namespace, name))
            return copy.deepcopy(found) if found is not None else None

    def list(
        self, kind: str, namespace: str | None = None, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        with self.lock:
            return [
                copy.deepcopy(obj)
                for (k, ns, _), obj in sorted(self.objects.items())
                if k == kind and (namespace is None or ns == namespace) and (where is None or where(obj))
            ]

    def create(self, obj: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
        with self.lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + random_suffix()
            key = (obj["kind"], meta.get("namespace", ""), meta["name"])
            if key in self.objects:
                raise ApiFailure(
                    409, "AlreadyExists", f'{BY_KIND[obj["kind"]].plural} "{meta["name"]}" already exists'
                )
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
            if obj["kind"] in ("Deployment", "ReplicaSet"):
                meta["generation"] = 1
            if check:
                self._check(obj)
            self.objects[key] = obj
            return copy.deepcopy(self._bump(obj, "ADDED"))

    def update(self, obj: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
        """Write `obj` over the stored one (no resourceVersion check: the controllers' own writes)."""
        with self.lock:
            meta = obj["metadata"]
            key = (obj["kind"], meta.get("namespace", ""), meta["name"])
            old = self.objects.get(key)
            if old is None:
                raise ApiFailure(404, "NotFound", f'{BY_KIND[obj["kind"]].plural} "{meta["name"]}" not found')
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if obj == old:
                return copy.deepcopy(old)
            if obj.get("spec") != old.get("spec") and "generation" in old["metadata"]:
                obj["metadata"]["generation"] = int(old["metadata"]["generation"]) + 1
            if check:
                self._check(obj)
            self.objects[key] = obj
            return copy.deepcopy(self._bump(obj, "MODIFIED"))

    def remove(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Gone for good (a pod the kubelet finished, or anything else deleted)."""
        with self.lock:
            obj = self.objects.pop((kind, namespace, name), None)
            if obj is not None:
                self._bump(obj, "DELETED")
            return obj

    def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """A client's delete: pods get a deletionTimestamp (the kubelet stops them, then they go); the rest
        go now, and what they own follows through the garbage collector."""
        with self.lock:
            obj = self.objects.get((kind, namespace, name))
            if obj is None:
                raise ApiFailure(404, "NotFound", f'{BY_KIND[kind].plural} "{name}" not found')
            if kind == "Pod":
                if not obj["metadata"].get("deletionTimestamp"):
                    obj = copy.deepcopy(obj)
                    obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                    obj["metadata"]["deletionGracePeriodSeconds"] = int(
                        obj.get("spec", {}).get("terminationGracePeriodSeconds", 30)
                    )
                    self.objects[(kind, namespace, name)] = obj
                    self._bump(obj, "MODIFIED")
                return copy.deepcopy(obj)
            removed = self.remove(kind, namespace, name)
            assert removed is not None
            return removed

    def events_since(self, rv: int) -> list[tuple[int, str, dict[str, Any]]]:
        with self.lock:
            return [event for event in self.events if event[0] > rv]


# --- HTTP -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    resource: Resource
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_path(path: str) -> Target:
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        raise ApiFailure(404, "NotFound", f"the server could not find the requested resource ({path})")
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest or (group, version, rest[0]) not in BY_PATH:
        raise ApiFailure(404, "NotFound", f"the server could not find the requested resource ({path})")
    resource = BY_PATH[(group, version, rest[0])]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    return Target(resource, namespace, name, sub)


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    store: Store
    logs: Callable[[str, str, str, bool, int | None], str]
    closing: threading.Event


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    # -- plumbing --

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            raise ApiFailure(400, "BadRequest", "the body is not JSON") from None

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        store = self.server.store
        store.requests.append((method, url.path, query.get("watch") in ("true", "1")))
        try:
            if self.headers.get("Authorization") != f"Bearer {store.token}":
                raise ApiFailure(401, "Unauthorized", "Unauthorized")
            target = parse_path(url.path)
            getattr(self, f"_{method.lower()}")(target, query)
        except ApiFailure as failure:
            self._json(failure.code, failure.status())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # -- verbs --

    def _namespace(self, target: Target) -> str:
        return (target.namespace or "") if target.resource.namespaced else ""

    def _received(self, obj: Any, target: Target, *, name: str | None = None) -> dict[str, Any]:
        """A client's object: its kind, namespace and name must fit the path, and it must fit the schema."""
        store = self.server.store
        if not isinstance(obj, dict):
            raise ApiFailure(400, "BadRequest", "the body must be an object")
        store.received.append(copy.deepcopy(obj))
        kind = obj.get("kind")
        if kind != target.resource.kind or obj.get("apiVersion") != target.resource.api_version:
            raise ApiFailure(
                400,
                "BadRequest",
                f"the body is a {obj.get('apiVersion')}/{kind}, the path wants "
                f"{target.resource.api_version}/{target.resource.kind}",
            )
        meta = obj.setdefault("metadata", {})
        if target.resource.namespaced:
            if meta.get("namespace", target.namespace) != target.namespace:
                raise ApiFailure(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = target.namespace
        if name is not None and meta.get("name", name) != name:
            raise ApiFailure(400, "BadRequest", "the name of the object does not match the name on the URL")
        problem = validate(obj)
        if problem is not None:
            store.rejected.append(f"{self.command} {self.path}: {problem}")
            raise ApiFailure(422, "Invalid", f"{target.resource.kind} is invalid: {problem}")
        return obj

    def _get(self, target: Target, query: dict[str, str]) -> None:
        store = self.server.store
        namespace = (
            self._namespace(target)
            if target.namespace is not None or not target.resource.namespaced
            else None
        )
        if target.name is None:
            if query.get("watch") in ("true", "1"):
                self._watch(target, namespace, query)
                return
            items = self._matching(target, namespace, query)
            self._json(
                200,
                {
                    "apiVersion": target.resource.api_version,
                    "kind": f"{target.resource.kind}List",
                    "metadata": {"resourceVersion": str(store.rv)},
                    "items": [
                        {k: v for k, v in item.items() if k not in ("apiVersion", "kind")} for item in items
                    ],
                },
            )
            return
        if target.subresource == "log":
            tail = int(query["tailLines"]) if query.get("tailLines") else None
            text = self.server.logs(
                target.namespace or "",
                target.name,
                query.get("container", ""),
                query.get("previous") in ("true", "1"),
                tail,
            )
            self._text(200, text)
            return
        obj = store.get(target.resource.kind, self._namespace(target), target.name)
        if obj is None:
            raise ApiFailure(404, "NotFound", f'{target.resource.plural} "{target.name}" not found')
        self._json(200, obj)

    def _matching(self, target: Target, namespace: str | None, query: dict[str, str]) -> list[dict[str, Any]]:
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")

        def where(obj: dict[str, Any]) -> bool:
            return selector_match(labels, obj["metadata"].get("labels") or {}) and field_match(fields, obj)

        return self.server.store.list(target.resource.kind, namespace, where)

    def _watch(self, target: Target, namespace: str | None, query: dict[str, str]) -> None:
        store = self.server.store
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(event: str, obj: dict[str, Any]) -> None:
            data = json.dumps({"type": event, "object": obj}).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def wanted(obj: dict[str, Any]) -> bool:
            meta = obj["metadata"]
            return (
                obj["kind"] == target.resource.kind
                and (namespace is None or meta.get("namespace", "") == namespace)
                and selector_match(labels, meta.get("labels") or {})
                and field_match(fields, obj)
            )

        since = int(query.get("resourceVersion") or 0)
        if not since:
            # Without a resourceVersion a watch starts with every current object, as ADDED.
            with store.lock:
                since = store.rv
                current = self._matching(target, namespace, query)
            for obj in current:
                send("ADDED", obj)
        while time.monotonic() < deadline and not self.server.closing.is_set():
            with store.lock:
                events = store.events_since(since)
                if not events:
                    store.changed.wait(0.5)
                    continue
            for rv, event, obj in events:
                since = rv
                if wanted(obj):
                    send(event, obj)
        self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def _post(self, target: Target, query: dict[str, str]) -> None:
        if target.name is not None:
            raise ApiFailure(405, "MethodNotAllowed", "POST is for collections")
        obj = self._received(self._body(), target)
        created = self.server.store.create(obj, check=False)
        self._json(201, created)

    def _put(self, target: Target, query: dict[str, str]) -> None:
        store = self.server.store
        if target.name is None:
            raise ApiFailure(405, "MethodNotAllowed", "PUT needs a name")
        obj = self._received(self._body(), target, name=target.name)
        with store.lock:
            current = store.get(target.resource.kind, self._namespace(target), target.name)
            if current is None:
                raise ApiFailure(404, "NotFound", f'{target.resource.plural} "{target.name}" not found')
            sent_rv = obj["metadata"].get("resourceVersion")
            if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
                raise ApiFailure(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on {target.resource.plural} "
                    f'"{target.name}": the object has been modified; please apply your '
                    f"changes to the latest version and try again",
                )
            for field in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "ownerReferences"):
                if field in current["metadata"] and field not in obj["metadata"]:
                    obj["metadata"][field] = current["metadata"][field]
            if target.subresource != "status" and "status" in current:
                obj["status"] = current["status"]
            self._json(200, store.update(obj, check=False))

    def _patch(self, target: Target, query: dict[str, str]) -> None:
        store = self.server.store
        if target.name is None:
            raise ApiFailure(405, "MethodNotAllowed", "PATCH needs a name")
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        patch = self._body()
        with store.lock:
            current = store.get(target.resource.kind, self._namespace(target), target.name)
            if current is None:
                raise ApiFailure(404, "NotFound", f'{target.resource.plural} "{target.name}" not found')
            if content_type == "application/json-patch+json":
                merged = json_patch(current, patch)
            elif content_type in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ):
                merged = merge_patch(current, patch)
            else:
                raise ApiFailure(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format: {content_type}",
                )
            merged["metadata"]["uid"] = current["metadata"]["uid"]
            merged = self._received(merged, target, name=target.name)
            self._json(200, store.update(merged, check=False))

    def _delete(self, target: Target, query: dict[str, str]) -> None:
        if target.name is None:
            raise ApiFailure(405, "MethodNotAllowed", "DELETE of a collection is not supported here")
        deleted = self.server.store.delete(target.resource.kind, self._namespace(target), target.name)
        if target.resource.kind == "Pod":
            self._json(200, deleted)
        else:
            self._json(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": target.name,
                        "kind": target.resource.plural,
                        "uid": deleted["metadata"]["uid"],
                    },
                },
            )


def api_server_start(
    store: Store, logs: Callable[[str, str, str, bool, int | None], str]
) -> tuple[ApiServer, str]:
    server = ApiServer(("127.0.0.1", 0), _Handler)
    server.store = store
    server.logs = logs
    server.closing = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True, name="kube-apiserver").start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def api_server_stop(server: ApiServer) -> None:
    server.closing.set()
    with server.store.lock:
        server.store.changed.notify_all()
    server.shutdown()
    server.server_close()


def owners(obj: dict[str, Any]) -> Iterable[str]:
    return (ref.get("uid", "") for ref in obj["metadata"].get("ownerReferences") or [])
