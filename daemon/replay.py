"""A replay of Twilio's REST API (v2010, the lists commsync reads) from bundled list pages.

``commsync demo`` points the real TwilioConnector at it, so calls and texts
are captured with no Twilio account and no network. The bundled files are
list pages as Twilio returns them (the ``calls``, ``messages`` and
``recordings`` envelopes). The server answers each request from their items
the way api.twilio.com does: filters applied (Twilio's date filters read
whole UTC days), newest first, pages linked by ``next_page_uri`` with a
``PageToken``; so the connector's window, paging, child legs and recordings
run as they would against Twilio. Read only, loopback only, stdlib only.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

API = "/2010-04-01"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ListKind:
    """One list resource: its envelope key, its filters, and how its ``X<=DAY`` filter reads."""

    key: str
    dates: Mapping[str, str]  # query name -> item field; the first one orders the list
    equals: Mapping[str, str]  # query name -> item field, matched exactly
    # Twilio's docs: Calls "started before" the day, Messages "on and before" it,
    # Recordings "at or before midnight" of it.
    before_day: str  # "before" | "through" | "midnight"


LISTS = {
    "Calls.json": ListKind(
        "calls",
        {"StartTime": "start_time", "EndTime": "end_time"},
        {"To": "to", "From": "from", "ParentCallSid": "parent_call_sid", "Status": "status"},
        "before",
    ),
    "Messages.json": ListKind("messages", {"DateSent": "date_sent"}, {"To": "to", "From": "from"}, "through"),
    "Recordings.json": ListKind(
        "recordings", {"DateCreated": "date_created"}, {"CallSid": "call_sid", "ConferenceSid": "conference_sid"}, "midnight"
    ),
}
_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>AC[0-9a-fA-F]{32})/(?P<rest>.+)$")
_ONE_CALL = re.compile(r"^Calls/(CA[0-9a-fA-F]{32})\.json$")


class BadRequest(ValueError):
    """A query Twilio would refuse with 400."""


class Replay:
    """The items of one account's bundled list pages, answering list requests. Pure: no I/O."""

    def __init__(self, account_sid: str, items: Mapping[str, list[dict[str, Any]]]):
        self.account_sid = account_sid
        self._items = {
            resource: sorted(items.get(kind.key, []), key=lambda item, kind=kind: _order(item, kind), reverse=True)
            for resource, kind in LISTS.items()
        }

    @classmethod
    def from_pages(cls, paths: Iterable[Path]) -> Replay:
        """Read list pages (Twilio's JSON envelopes); every item must belong to one account."""
        items: dict[str, list[dict[str, Any]]] = {}
        for path in paths:
            page = json.loads(path.read_text(encoding="utf-8"))
            keys = [kind.key for kind in LISTS.values() if kind.key in page]
            if len(keys) != 1 or not isinstance(page[keys[0]], list):
                raise ValueError(f"{path.name}: not a Twilio list page of calls, messages or recordings")
            items.setdefault(keys[0], []).extend(page[keys[0]])
        accounts = {item.get("account_sid") for listed in items.values() for item in listed}
        if len(accounts) != 1:
            raise ValueError(f"the pages must hold one account's items, not {sorted(map(str, accounts))}")
        return cls(accounts.pop(), items)

    def answer(self, path: str, query: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for a GET of ``path`` with ``query`` (decoded pairs, in order)."""
        match = _PATH.match(path)
        if match is None or match["account"] != self.account_sid:
            return 404, _error(404, f"The requested resource {path} was not found")
        rest = match["rest"]
        try:
            if rest in LISTS:
                return 200, self._list(path, rest, query)
        except BadRequest as exc:
            return 400, _error(400, str(exc))
        one = _ONE_CALL.match(rest)
        if one is not None:
            for item in self._items["Calls.json"]:
                if item.get("sid") == one[1]:
                    return 200, item
        return 404, _error(404, f"The requested resource {path} was not found")

    def _list(self, path: str, resource: str, query: list[tuple[str, str]]) -> dict[str, Any]:
        kind = LISTS[resource]
        q = dict(query)
        tests = [_equals(kind.equals[name], value) for name, value in q.items() if name in kind.equals and value]
        for name, value in q.items():
            param, op = name.rstrip("<>"), name[len(name.rstrip("<>")) :] or "="
            if param in kind.dates and value and op in ("=", "<", ">"):
                tests.append(_date_test(kind.dates[param], op, value, kind.before_day, strict=resource == "Calls.json"))
        items = [item for item in self._items[resource] if all(test(item) for test in tests)]
        return _page(kind.key, items, path, query)


def _order(item: Mapping[str, Any], kind: ListKind) -> tuple[datetime, str]:
    field = next(iter(kind.dates.values()))
    when = _time(item.get(field)) or _time(item.get("date_created")) or datetime.min.replace(tzinfo=UTC)
    return when, str(item.get("sid"))


def _time(value: Any) -> datetime | None:
    """An item's RFC 2822 date as aware UTC; None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return parsedate_to_datetime(value).astimezone(UTC)
    except (TypeError, ValueError, IndexError):
        return None


def _bound(value: str) -> tuple[datetime, bool]:
    """A filter value: (instant, whether it names a whole UTC day)."""
    try:
        day = date.fromisoformat(value)
        return datetime(day.year, day.month, day.day, tzinfo=UTC), True
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"Invalid date filter value {value[:40]!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC), False


def _date_test(field: str, op: str, value: str, before_day: str, *, strict: bool) -> Callable[[Mapping[str, Any]], bool]:
    """``X=`` is the value's day; ``X>=`` at or after; ``X<=`` as the list reads it (``before_day``)."""
    at, whole_day = _bound(value)
    if op == "=":
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        lo, hi = day, day + timedelta(days=1)
        accept: Callable[[datetime], bool] = lambda t: lo <= t < hi  # noqa: E731
    elif op == ">":
        accept = lambda t: t >= at  # noqa: E731
    elif whole_day and before_day == "through":
        accept = lambda t: t < at + timedelta(days=1)  # noqa: E731
    elif whole_day and before_day == "midnight" or not whole_day and not strict:
        accept = lambda t: t <= at  # noqa: E731
    else:
        accept = lambda t: t < at  # noqa: E731

    def test(item: Mapping[str, Any]) -> bool:
        t = _time(item.get(field))
        return t is not None and accept(t)  # an item without the date never matches a date filter

    return test


def _equals(field: str, value: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda item: item.get(field) == value


def _int(q: Mapping[str, str], name: str, default: int) -> int:
    try:
        return int(q.get(name) or default)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None


def _page(key: str, items: list[dict[str, Any]], path: str, query: list[tuple[str, str]]) -> dict[str, Any]:
    """One page of ``items`` in Twilio's list envelope; ``PageToken`` PA<sid>/PB<sid> pages after/before that item."""
    q = dict(query)
    size = max(1, min(MAX_PAGE_SIZE, _int(q, "PageSize", DEFAULT_PAGE_SIZE)))
    page = max(0, _int(q, "Page", 0))
    token = q.get("PageToken") or ""
    sids = [item.get("sid") for item in items]
    if token[:2] == "PA" and token[2:] in sids:
        first = sids.index(token[2:]) + 1
    elif token[:2] == "PB" and token[2:] in sids:
        first = max(0, sids.index(token[2:]) - size)
    else:
        first = page * size
    chunk = items[first : first + size]
    filters = [(k, v) for k, v in query if k not in ("PageSize", "Page", "PageToken")]

    def uri(n: int, token: str | None = None) -> str:
        return path + "?" + urlencode([*filters, ("PageSize", str(size)), ("Page", str(n)), *([("PageToken", token)] if token else [])])

    start = page * size
    return {
        "end": start + len(chunk) - 1 if chunk else 0,
        "first_page_uri": uri(0),
        "next_page_uri": uri(page + 1, "PA" + chunk[-1]["sid"]) if chunk and first + size < len(items) else None,
        "page": page,
        "page_size": size,
        "previous_page_uri": uri(page - 1, "PB" + chunk[0]["sid"]) if chunk and first > 0 else None,
        "start": start,
        "uri": uri(page, token or None),
        key: chunk,
    }


def _error(status: int, message: str) -> dict[str, Any]:
    """Twilio's v2010 error body."""
    code = {400: 20001, 404: 20404, 405: 20004}.get(status, 20000 + status)
    return {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}


class ReplayServer:
    """``replay`` over HTTP on 127.0.0.1 (a free port), from a thread; a context manager.

    ``requests`` lists every request served (path and query), for reporting.
    """

    def __init__(self, replay: Replay):
        self.replay = replay
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the replay server is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ReplayServer:
        owner = self

        class Handler(_Handler):
            server_of = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # A short poll keeps shutdown quick: the demo waits for it.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="twilio-replay", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def _serve(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(target)
        if method != "GET":
            return 405, _error(405, f"{method} is not replayed: the replay is read only")
        parts = urlsplit(target)
        return self.replay.answer(parts.path, parse_qsl(parts.query, keep_blank_values=True))


class _Handler(BaseHTTPRequestHandler):
    server_of: ReplayServer
    server_version = "commsync-twilio-replay"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the demo's output is its table

    def _reply(self) -> None:
        status, body = self.server_of._serve(self.command, self.path)
        payload = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _reply
