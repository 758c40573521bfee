"""The server's refusals of writes, without the documents the driver's errors carry.

pymongo's OperationFailure and its kin (BulkWriteError, WriteError,
WriteConcernError) put the server's whole answer in their text ("batch op
errors occurred, full error: {...}"), and a bulk write's answer holds each
refused operation with its document: a customer's name, emails and phones. The
runner stores an error's text in source_status and logs its traceback, so the
store's write methods raise `StoreWriteRefused` instead, naming counts and
error codes only. It is an ordinary error to the runner (retry.classify), as
the driver's was.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import pymongo.errors

P = ParamSpec("P")
T = TypeVar("T")

# Write errors carry a code without its name; these are the ones a store meets.
_NAMES = {
    2: "BadValue",
    11: "UserNotFound",
    13: "Unauthorized",
    14: "TypeMismatch",
    28: "PathNotViable",
    50: "MaxTimeMSExpired",
    52: "DollarPrefixedFieldName",
    56: "EmptyFieldName",
    64: "WriteConcernFailed",
    66: "ImmutableField",
    112: "WriteConflict",
    121: "DocumentValidationFailure",
    10334: "BSONObjectTooLarge",
    11000: "DuplicateKey",
    17419: "DocumentTooLarge",
}


class StoreWriteRefused(Exception):
    """The server refused a write. The text names counts and error codes, never a document."""

    def __init__(self, message: str, codes: tuple[int, ...] = ()):
        super().__init__(message)
        self.codes = codes


def refusal(exc: pymongo.errors.OperationFailure) -> StoreWriteRefused:
    """``exc`` as a `StoreWriteRefused`: how many writes, which codes; nothing of the server's message."""
    details = exc.details if isinstance(exc.details, Mapping) else {}
    errors = [e for e in details.get("writeErrors") or () if isinstance(e, Mapping)]
    concern = [e for e in details.get("writeConcernErrors") or () if isinstance(e, Mapping)]
    if errors or concern:
        entries = errors + concern
        parts = []
        if errors:
            parts.append(f"{len(errors)} writes refused")
        if concern:
            parts.append(f"write concern not satisfied ({len(concern)})")
        what = ", ".join(parts)
    else:
        entries = [{"code": exc.code, "codeName": details.get("codeName")}]
        what = "write refused" if isinstance(exc, pymongo.errors.WriteError | pymongo.errors.WriteConcernError) else "command refused"
    counted = Counter(_code(e) for e in entries)
    codes = tuple(sorted(c for c, _ in counted))
    names = ", ".join(f"{code} {name}".strip() for code, name in sorted(counted))
    return StoreWriteRefused(f"{what}: codes [{names}]", codes)


def _code(entry: Mapping[str, Any]) -> tuple[int, str]:
    code = entry.get("code")
    code = code if isinstance(code, int) else -1
    name = entry.get("codeName")
    # The server's name only when it is one: a word, never text that could quote a value.
    if not (isinstance(name, str) and name.isidentifier() and len(name) <= 60):
        name = _NAMES.get(code, "")
    return code, name


def sanitized(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Make a store method raise `StoreWriteRefused` for the driver's refusals (OperationFailure).

    The new error is raised outside the ``except`` block and ``from None``:
    neither its cause nor its context holds the driver's error, so a logged
    traceback shows no document either. Outages (ConnectionFailure) pass as
    they are: the runner knows them by class.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except pymongo.errors.OperationFailure as exc:
            refused = refusal(exc)
        raise refused from None

    return wrapper
