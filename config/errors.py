"""Domain errors raised by services; the API and the UI turn them into responses that say why."""

from __future__ import annotations


class DomainError(Exception):
    """A request that cannot be carried out as asked. `field` names the input at fault, if any."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, object]:
        body: dict[str, object] = {"detail": self.message, "code": self.code}
        if self.field:
            body["errors"] = {self.field: [self.message]}
        return body


class Conflict(DomainError):
    """The object is not in the state the action expects (a concurrent change, or a finished rollout)."""

    status_code = 409
    code = "conflict"


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"
