"""Errors a client can cause, and the FHIR OperationOutcome body every error response carries."""

from __future__ import annotations

from typing import Any

# FHIR R4 IssueType codes (http://hl7.org/fhir/issue-type) used here.
_ISSUE_TYPE_BY_STATUS = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    412: "incomplete",
    413: "too-costly",
    415: "not-supported",
    429: "throttled",
    500: "exception",
    503: "transient",
}


def operation_outcome(
    message: str, *, code: str = "invalid", severity: str = "error", expression: str | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": message}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def issue_type(status: int) -> str:
    return _ISSUE_TYPE_BY_STATUS.get(status, "processing" if status < 500 else "exception")


class ServiceError(Exception):
    """A request the service cannot answer: HTTP status plus an OperationOutcome that says why."""

    def __init__(self, status: int, message: str, *, expression: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.expression = expression
        self.code = code or issue_type(status)

    def to_dict(self) -> dict[str, Any]:
        return operation_outcome(self.message, code=self.code, expression=self.expression)


class BadRequest(ServiceError):
    """400: the request is not a usable CDS Hooks call."""

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(400, message, expression=expression)
