"""A local fake of Twilio's REST API v2010 (read side) for tests.

``FakeTwilio`` is a threaded ``http.server`` on 127.0.0.1 (random free port) that
answers the *real* ``twilio`` Python client (9.x) with the response shapes of
Twilio's OpenAPI spec ``twilio_api_v2010.json`` (twilio/twilio-oai): the record
schemas ``api.v2010.account.call``, ``api.v2010.account.message``,
``api.v2010.account.recording``, ``api.v2010.account.call.call_recording`` and
``api.v2010.account``, the list envelope (``calls``/``messages``/``recordings``
plus ``first_page_uri``, ``next_page_uri``, ``previous_page_uri``, ``page``,
``page_size``, ``start``, ``end``, ``uri``), RFC 2822 dates
("Tue, 31 Aug 2010 20:36:28 +0000") and Twilio's error body
``{"code", "message", "more_info", "status"}``.

Pointing the real client at the fake (findings from twilio 9.13 source)
------------------------------------------------------------------------
How a request travels: ``CallList.page()`` -> ``Version.page()`` ->
``Domain.request()``, which builds an absolute URL from ``Domain.base_url``
(``"https://api.twilio.com"``, set in ``ApiBase.__init__``) -> ``ClientBase.request()``
(adds the User-Agent/Accept headers and Basic auth, and rewrites the host in
``get_hostname()`` when an edge or region is set) -> ``client.http_client.request(method,
url, params=..., auth=...)``. Paging: ``Page.next_page_url`` is
``domain.absolute_url(payload["next_page_uri"])``, so a *relative*
``next_page_uri`` is followed against the same domain base URL. That URL already
carries the query string, and it is requested with ``params=None``.

1. Recommended: inject an ``HttpClient`` that rewrites scheme and host. The
   ``Client(..., http_client=...)`` parameter is supported public API.
   ``FakeTwilioHttpClient`` (a subclass of ``twilio.http.http_client.TwilioHttpClient``)
   and ``FakeAsyncTwilioHttpClient`` (a subclass of
   ``twilio.http.async_http_client.AsyncTwilioHttpClient``) override only
   ``request()``. They replace ``https://<anything>.twilio.com`` with
   ``fake.base_url`` and keep the path and query, then call the parent. This is
   the last step before the socket, so it works for every Twilio domain, for
   the URLs of followed pages, and even when TWILIO_EDGE/TWILIO_REGION are set
   (``get_hostname`` has run by then). The sync subclass sets
   ``session.trust_env = False`` so that HTTP(S)_PROXY and ~/.netrc on the
   machine cannot divert or re-authenticate requests to 127.0.0.1. aiohttp
   already ignores the environment by default (``trust_env=False``).
   ``client_for(fake, sid, token)`` builds such a sync Client.
   ``async_client_for(...)`` builds the async one; it must be called inside a
   running event loop, because ``AsyncTwilioHttpClient.__init__`` creates an
   ``aiohttp.ClientSession``. Always ``await client.http_client.close()``.
   Then use ``await client.calls.list_async(...)`` and the other ``*_async`` methods.

2. Alternative, with no custom class: ``client.api.base_url = fake.base_url``.
   ``client.api`` is created lazily and then cached, and ``Domain.base_url`` is a
   plain attribute, so everything under ``client.api`` (calls, messages,
   recordings, accounts, and next_page) goes to the fake. Caveats: it covers only
   the api.twilio.com domain. ``get_hostname`` mangles ``127.0.0.1:PORT`` if an
   edge or region is configured. Note that ``Client(environment={})`` does NOT
   isolate you from os.environ (``{}`` is falsy, so ``environment or os.environ``
   falls back to os.environ). Pass ``edge``/``region`` explicitly or use approach 1.

Client behaviour worth knowing (verified by tests/test_twilio_fake.py)
---------------------------------------------------------------------
* Query names: ``To``, ``From``, ``ParentCallSid``, ``Status``, ``StartTime``,
  ``StartTime<`` (start_time_before), ``StartTime>`` (start_time_after),
  ``EndTime``/``EndTime<``/``EndTime>``, ``DateSent``/``DateSent<``/``DateSent>``,
  ``DateCreated``/``DateCreated<``/``DateCreated>``, ``PageSize``, ``Page``,
  ``PageToken``. On the wire: ``StartTime%3E=2024-01-02T00%3A00%3A00Z``; written
  unencoded that is the documented ``StartTime>=...``.
* The client serialises ``datetime`` *and* ``date`` objects for the Calls,
  Messages and account Recordings filters as ``%Y-%m-%dT%H:%M:%SZ``
  (``serialize.iso8601_datetime``; a date becomes ``...T00:00:00Z``). A naive
  datetime is formatted as-is, so it is read as UTC. Strings are sent verbatim.
  An *aware non-UTC* datetime is also formatted as-is with a literal ``Z``
  (12:00+02:00 is sent as ``12:00:00Z``, two hours off): convert to UTC first.
  The call-scoped Recordings filter (``calls(sid).recordings.list``) uses
  ``serialize.iso8601_date`` and sends ``YYYY-MM-DD``. The spec types these as
  ``format: date-time``, but its descriptions say ``YYYY-MM-DD`` (whole days, UTC/GMT).
* ``list(limit=N)`` without page_size sends ``PageSize=N``. Without either, no
  PageSize is sent and the server default (50) applies.
* A failed *list* page (401/429/5xx) raises plain ``TwilioException("Unable to
  fetch page", response)``, NOT ``TwilioRestException`` (``Page.process_response``).
  Use ``exc.args[1].status_code`` / ``.headers``. A failed *fetch* raises
  ``TwilioRestException`` (``.status``, ``.code``, ``.msg``) with no headers, so
  Retry-After is lost. The client never retries by default: ``max_retries=None``
  mounts no urllib3 Retry, and the async client only wraps in aiohttp_retry when
  ``max_retries`` is given.
* ``deserialize.rfc2822_datetime`` returns ``None`` for an unparseable date (it
  does not raise, despite its docstring), so a malformed ``start_time`` arrives
  as ``None``. A record without ``sid`` arrives with ``sid=None``.

Date-filter semantics implemented here (Twilio documents whole days in UTC)
--------------------------------------------------------------------------
``X=D`` means on day D. ``X>=D`` means at or after D 00:00:00Z. ``X<=D``: for
Messages ("on and before a specific date") this is before D+1 00:00. For Calls
("started before this date") it is strictly before D 00:00. For Recordings ("at or
before midnight on a given date") it is at or before D 00:00. A full datetime value T
is compared exactly: ``>`` is >= T and ``<`` is <= T (Calls: < T). Equality always
uses T's day. With ``FakeTwilio(datetime_filter_precision="day")`` every datetime value
is first truncated to its UTC date. This models an API that ignores the time part,
so a connector can be tested for correctness either way. Records whose
filtered field is null (a queued call without start_time, an unsent message
without date_sent) never match a date filter. Accepted value formats: YYYY-MM-DD,
ISO 8601 (``T`` or space, optional fraction, ``Z``/offset/naive=UTC), RFC 2822,
and ``MM/DD/YYYY HH:MM:SS TZ`` (the spec's "fun date formats" examples).
Anything else returns 400.

Paging follows the spec examples: ``PageToken=PA<last sid>`` for next and
``PB<first sid>`` for previous (keyset, so rows inserted mid-pagination do not
shift pages). ``Page`` is client state. Without a token, the offset is
Page*PageSize. ``PageSize`` defaults to 50 and is clamped to 1..1000.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from email.utils import format_datetime, mktime_tz, parsedate_tz
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

API_VERSION = "2010-04-01"
REAL_BASE_URL = "https://api.twilio.com"

# Property names in the spec's order (components.schemas.*.properties).
ACCOUNT_FIELDS = [
    "auth_token", "date_created", "date_updated", "friendly_name",
    "owner_account_sid", "sid", "status", "subresource_uris", "type", "uri",
]
CALL_FIELDS = [
    "sid", "date_created", "date_updated", "parent_call_sid", "account_sid",
    "to", "to_formatted", "from", "from_formatted", "phone_number_sid",
    "status", "start_time", "end_time", "duration", "price", "price_unit",
    "direction", "answered_by", "api_version", "forwarded_from", "group_sid",
    "caller_name", "queue_time", "trunk_sid", "uri", "subresource_uris",
]
MESSAGE_FIELDS = [
    "body", "num_segments", "direction", "from", "to", "date_updated", "price",
    "error_message", "uri", "account_sid", "num_media", "status",
    "messaging_service_sid", "sid", "date_sent", "date_created", "error_code",
    "price_unit", "api_version", "subresource_uris",
]
RECORDING_FIELDS = [  # api.v2010.account.recording
    "account_sid", "api_version", "call_sid", "conference_sid", "date_created",
    "date_updated", "start_time", "duration", "sid", "price", "price_unit",
    "status", "channels", "source", "error_code", "uri", "encryption_details",
    "subresource_uris", "media_url",
]
CALL_RECORDING_FIELDS = [  # api.v2010.account.call.call_recording
    "account_sid", "api_version", "call_sid", "conference_sid", "date_created",
    "date_updated", "start_time", "duration", "sid", "price", "uri",
    "encryption_details", "price_unit", "status", "channels", "source",
    "error_code", "track",
]

CALL_STATUSES = {"queued", "ringing", "in-progress", "completed", "busy",
                 "failed", "no-answer", "canceled"}
CALL_TERMINAL = {"completed", "busy", "failed", "no-answer", "canceled"}
CALL_DIRECTIONS = {"inbound", "outbound-api", "outbound-dial",
                   "trunking-terminating", "trunking-originating"}
MESSAGE_STATUSES = {"queued", "sending", "sent", "failed", "delivered",
                    "undelivered", "receiving", "received", "accepted",
                    "scheduled", "read", "partially_delivered", "canceled"}
MESSAGE_UNSENT = {"queued", "sending", "accepted", "scheduled", "receiving",
                  "canceled"}
MESSAGE_DIRECTIONS = {"inbound", "outbound-api", "outbound-call", "outbound-reply"}
RECORDING_STATUSES = {"in-progress", "paused", "stopped", "processing",
                      "completed", "absent", "deleted"}
RECORDING_SOURCES = {"DialVerb", "Conference", "OutboundAPI", "Trunking",
                     "RecordVerb", "StartCallRecordingAPI",
                     "StartConferenceRecordingAPI"}

DATETIME_FIELDS = {"date_created", "date_updated", "start_time", "end_time",
                   "date_sent"}
STRING_NUMBER_FIELDS = {"duration", "num_media", "num_segments", "queue_time",
                        "price"}

ERROR_MESSAGES = {
    400: (20001, "Bad Request"),
    401: (20003, "Authenticate"),
    403: (20403, "Forbidden"),
    404: (20404, "The requested resource was not found"),
    405: (20004, "Method not allowed"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    502: (20502, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
}


def twilio_error(status: int, message: str | None = None,
                 code: int | None = None) -> dict[str, Any]:
    """Twilio's (legacy, v2010) error body."""
    dcode, dmsg = ERROR_MESSAGES.get(status, (20000 + status, "Error"))
    code = code or dcode
    return {
        "code": code,
        "message": message or dmsg,
        "more_info": "https://www.twilio.com/docs/errors/%d" % code,
        "status": status,
    }


def rfc2822(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return format_datetime(dt.astimezone(UTC))


def _utc(dt: Any) -> datetime | None:
    """Normalise a user-supplied datetime (naive = UTC) to whole seconds UTC."""
    if dt is None:
        return None
    if isinstance(dt, str):
        dt = datetime.fromisoformat(dt.replace("Z", "+00:00"))
    elif isinstance(dt, date) and not isinstance(dt, datetime):
        dt = datetime(dt.year, dt.month, dt.day)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).replace(microsecond=0)


def _hexsid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def format_number(n: str | None) -> str | None:
    """Twilio's *_formatted for NANP numbers; other identifiers unchanged."""
    if n is None:
        return None
    m = re.fullmatch(r"\+1(\d{3})(\d{3})(\d{4})", n)
    if m:
        return "(%s) %s-%s" % m.groups()
    return n


# ---------------------------------------------------------------- date filters

_TZ_ABBR = {"UTC": 0, "GMT": 0, "Z": 0, "EST": -5, "EDT": -4, "CST": -6,
            "CDT": -5, "MST": -7, "MDT": -6, "PST": -8, "PDT": -7}


class BadFilter(ValueError):
    pass


def parse_filter_value(raw: str) -> tuple[str, Any]:
    """Return ("date", date) or ("datetime", aware UTC datetime)."""
    s = raw.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
        try:
            return "date", date.fromisoformat(s)
        except ValueError as e:
            raise BadFilter(raw) from e
    m = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)"
        r"\s*(Z|[+-]\d{2}:?\d{2})?", s)
    if m:
        d, t, tz = m.groups()
        if tz and tz != "Z" and ":" not in tz:
            tz = tz[:3] + ":" + tz[3:]
        iso = "%sT%s%s" % (d, t, "+00:00" if tz in (None, "Z") else tz)
        try:
            return "datetime", _utc_exact(datetime.fromisoformat(iso))
        except ValueError as e:
            raise BadFilter(raw) from e
    m = re.fullmatch(r"(\d{2})/(\d{2})/(\d{4})\s+(\d{2}):(\d{2}):(\d{2})\s*([A-Z]{1,4})?", s)
    if m:
        mo, dd, yy, hh, mi, ss, tz = m.groups()
        off = _TZ_ABBR.get(tz or "UTC")
        if off is None:
            raise BadFilter(raw)
        try:
            dt = datetime(int(yy), int(mo), int(dd), int(hh), int(mi), int(ss),
                          tzinfo=timezone(timedelta(hours=off)))
        except ValueError as e:
            raise BadFilter(raw) from e
        return "datetime", _utc_exact(dt)
    tup = parsedate_tz(s)
    if tup is not None and re.search(r"[A-Za-z]{3}", s):
        try:
            return "datetime", datetime.fromtimestamp(mktime_tz(tup), UTC)
        except (TypeError, ValueError, OverflowError) as e:
            raise BadFilter(raw) from e
    raise BadFilter(raw)


def _utc_exact(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _day_start(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


def make_date_predicate(op: str, raw: str, *, le_day: str, lt_strict_datetime: bool,
                        precision: str) -> Callable[[datetime | None], bool]:
    """op in {"=", ">", "<"}; le_day in {"inclusive", "exclusive", "midnight"}."""
    kind, v = parse_filter_value(raw)
    if kind == "datetime" and (precision == "day" or op == "="):
        kind, v = "date", v.date()
    if kind == "date":
        lo = _day_start(v)
        hi = lo + timedelta(days=1)
        if op == "=":
            return lambda x: x is not None and lo <= x < hi
        if op == ">":
            return lambda x: x is not None and x >= lo
        if le_day == "inclusive":
            return lambda x: x is not None and x < hi
        if le_day == "exclusive":
            return lambda x: x is not None and x < lo
        return lambda x: x is not None and x <= lo
    if op == ">":
        return lambda x: x is not None and x >= v
    if lt_strict_datetime:
        return lambda x: x is not None and x < v
    return lambda x: x is not None and x <= v


# ---------------------------------------------------------------- request log

@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]          # decoded; e.g. {"StartTime>": "2024-01-02T00:00:00Z"}
    raw_query: str
    time: datetime
    auth_user: str | None = None
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.path + ("?" + self.raw_query if self.raw_query else "")


@dataclass
class _Fault:
    remaining: int
    kind: str                      # "status" | "disconnect" | "delay" | "malformed"
    path: str | None = None
    status: int = 500
    retry_after: Any = None
    body: Any = None
    headers: dict[str, str] | None = None
    seconds: float = 0.0
    malformed_kind: str = "missing_sid"
    index: int = 0
    skip: int = 0                  # let this many matching requests through first

    def matches(self, path: str) -> bool:
        return self.path is None or self.path in path


# ---------------------------------------------------------------- the fake

_ACCOUNT_RE = re.compile(r"^/2010-04-01/Accounts/(AC[0-9a-fA-F]{32})(?P<rest>.*)$")


class FakeTwilio:
    """Local fake of api.twilio.com/2010-04-01 (GET endpoints used for sync)."""

    def __init__(self, *, datetime_filter_precision: str = "exact",
                 clock: Callable[[], datetime] | None = None,
                 max_page_size: int = 1000, default_page_size: int = 50):
        if datetime_filter_precision not in ("exact", "day"):
            raise ValueError("datetime_filter_precision must be 'exact' or 'day'")
        self.datetime_filter_precision = datetime_filter_precision
        self.clock = clock or (lambda: datetime.now(UTC))
        self.max_page_size = max_page_size
        self.default_page_size = default_page_size
        self._lock = threading.RLock()
        self.accounts: dict[str, dict[str, Any]] = {}
        self.api_keys: dict[str, tuple[str, str]] = {}  # key_sid -> (account, secret)
        self.calls: dict[str, dict[str, Any]] = {}
        self.messages: dict[str, dict[str, Any]] = {}
        self.recordings: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None
        self.port: int | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FakeTwilio:
        if self._server is not None:
            return self
        fake = self

        class Handler(_Handler):
            pass
        Handler.fake = fake
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base_url = "http://127.0.0.1:%d" % self.port
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name="FakeTwilio:%d" % self.port, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _now(self) -> datetime:
        return _utc(self.clock())

    # ------------------------------------------------------------ accounts
    def add_account(self, account_sid: str | None = None,
                    auth_token: str | None = None, *,
                    friendly_name: str | None = None,
                    status: str = "active", type: str = "Full",
                    owner_account_sid: str | None = None,
                    date_created: Any = None) -> dict[str, Any]:
        account_sid = account_sid or _hexsid("AC")
        auth_token = auth_token or uuid.uuid4().hex
        created = _utc(date_created) or self._now()
        base = "/%s/Accounts/%s" % (API_VERSION, account_sid)
        subs = ["available_phone_numbers:AvailablePhoneNumbers", "calls:Calls",
                "conferences:Conferences",
                "incoming_phone_numbers:IncomingPhoneNumbers",
                "notifications:Notifications", "outgoing_caller_ids:OutgoingCallerIds",
                "recordings:Recordings", "transcriptions:Transcriptions",
                "addresses:Addresses", "signing_keys:SigningKeys",
                "connect_apps:ConnectApps", "sip:SIP",
                "authorized_connect_apps:AuthorizedConnectApps", "usage:Usage",
                "keys:Keys", "applications:Applications",
                "short_codes:SMS/ShortCodes", "queues:Queues",
                "messages:Messages", "balance:Balance"]
        rec = {
            "auth_token": auth_token,
            "date_created": created,
            "date_updated": created,
            "friendly_name": friendly_name or account_sid,
            "owner_account_sid": owner_account_sid or account_sid,
            "sid": account_sid,
            "status": status,
            "subresource_uris": {k: "%s/%s.json" % (base, v)
                                 for k, v in (s.split(":") for s in subs)},
            "type": type,
            "uri": base + ".json",
        }
        with self._lock:
            self.accounts[account_sid] = rec
        return dict(rec)

    def add_api_key(self, account_sid: str, key_sid: str | None = None,
                    secret: str | None = None) -> tuple[str, str]:
        key_sid = key_sid or _hexsid("SK")
        secret = secret or uuid.uuid4().hex
        with self._lock:
            if account_sid not in self.accounts:
                raise KeyError("unknown account %s" % account_sid)
            self.api_keys[key_sid] = (account_sid, secret)
        return key_sid, secret

    def _require_account(self, account_sid: str) -> None:
        if account_sid not in self.accounts:
            raise KeyError("unknown account %s; call add_account first" % account_sid)

    # ------------------------------------------------------------ calls
    def add_call(self, account_sid: str, **fields: Any) -> dict[str, Any]:
        self._require_account(account_sid)
        f = _normalise_fields(fields, CALL_FIELDS)
        now = self._now()
        status = f.get("status", "completed")
        if status not in CALL_STATUSES:
            raise ValueError("call status %r not in %s" % (status, sorted(CALL_STATUSES)))
        direction = f.get("direction", "inbound")
        if direction not in CALL_DIRECTIONS:
            raise ValueError("call direction %r not in %s" % (direction, sorted(CALL_DIRECTIONS)))
        sid = f.get("sid") or _hexsid("CA")
        if "start_time" in f:
            start = f["start_time"]
        else:
            start = None if status == "queued" else now
        end = f.get("end_time")
        duration = f.get("duration")
        if status in CALL_TERMINAL and start is not None:
            if end is None:
                secs = int(duration) if duration is not None else (30 if status == "completed" else 0)
                end = start + timedelta(seconds=secs)
            if duration is None:
                duration = str(max(0, int((end - start).total_seconds())))
        created = f.get("date_created") or (start or now)
        to = f.get("to", "+15558675310")
        frm = f.get("from", "+15017122661")
        base = "/%s/Accounts/%s/Calls/%s" % (API_VERSION, account_sid, sid)
        rec = {
            "sid": sid,
            "date_created": created,
            "date_updated": f.get("date_updated") or end or created,
            "parent_call_sid": f.get("parent_call_sid"),
            "account_sid": account_sid,
            "to": to,
            "to_formatted": f.get("to_formatted", format_number(to)),
            "from": frm,
            "from_formatted": f.get("from_formatted", format_number(frm)),
            "phone_number_sid": f.get("phone_number_sid",
                                      _hexsid("PN") if direction == "inbound" else None),
            "status": status,
            "start_time": start,
            "end_time": end,
            "duration": duration,
            "price": f.get("price"),
            "price_unit": f.get("price_unit", "USD"),
            "direction": direction,
            "answered_by": f.get("answered_by"),
            "api_version": f.get("api_version", API_VERSION),
            "forwarded_from": f.get("forwarded_from"),
            "group_sid": f.get("group_sid"),
            "caller_name": f.get("caller_name"),
            "queue_time": f.get("queue_time", "0"),
            "trunk_sid": f.get("trunk_sid"),
            "uri": base + ".json",
            "subresource_uris": {
                k: "%s/%s.json" % (base, v) for k, v in [
                    ("feedback", "Feedback"), ("notifications", "Notifications"),
                    ("recordings", "Recordings"), ("streams", "Streams"),
                    ("payments", "Payments"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                    ("events", "Events"), ("siprec", "Siprec"),
                    ("transcriptions", "Transcriptions")]},
        }
        with self._lock:
            self.calls[sid] = rec
        return dict(rec)

    def update_call(self, sid: str, **fields: Any) -> dict[str, Any]:
        """Mutate a call like Twilio does over its life, e.g.
        update_call(sid, status="completed", end_time=..., duration=42) and
        later update_call(sid, price="-0.0130"). date_updated is bumped."""
        f = _normalise_fields(fields, CALL_FIELDS)
        with self._lock:
            rec = self.calls[sid]
            if "status" in f and f["status"] not in CALL_STATUSES:
                raise ValueError("call status %r" % f["status"])
            now = self._now()
            rec.update(f)
            if rec["status"] != "queued" and rec["start_time"] is None:
                rec["start_time"] = now
            if rec["status"] in CALL_TERMINAL and rec["start_time"] is not None:
                if rec["end_time"] is None:
                    if rec["duration"] is not None:
                        rec["end_time"] = rec["start_time"] + timedelta(seconds=int(rec["duration"]))
                    else:
                        rec["end_time"] = max(now, rec["start_time"])
                if rec["duration"] is None or "end_time" in f and "duration" not in f:
                    rec["duration"] = str(max(0, int((rec["end_time"] - rec["start_time"]).total_seconds())))
            if "to" in f and "to_formatted" not in f:
                rec["to_formatted"] = format_number(rec["to"])
            if "from" in f and "from_formatted" not in f:
                rec["from_formatted"] = format_number(rec["from"])
            rec["date_updated"] = f.get("date_updated") or max(now, rec["date_created"])
            return dict(rec)

    # ------------------------------------------------------------ messages
    def add_message(self, account_sid: str, **fields: Any) -> dict[str, Any]:
        self._require_account(account_sid)
        f = _normalise_fields(fields, MESSAGE_FIELDS)
        now = self._now()
        direction = f.get("direction", "outbound-api")
        if direction not in MESSAGE_DIRECTIONS:
            raise ValueError("message direction %r not in %s" % (direction, sorted(MESSAGE_DIRECTIONS)))
        status = f.get("status", "received" if direction == "inbound" else "delivered")
        if status not in MESSAGE_STATUSES:
            raise ValueError("message status %r not in %s" % (status, sorted(MESSAGE_STATUSES)))
        sid = f.get("sid") or _hexsid("SM")
        created = f.get("date_created") or f.get("date_sent") or now
        if "date_sent" in f:
            sent = f["date_sent"]
        else:
            sent = None if status in MESSAGE_UNSENT else created
        base = "/%s/Accounts/%s/Messages/%s" % (API_VERSION, account_sid, sid)
        rec = {
            "body": f.get("body", ""),
            "num_segments": f.get("num_segments", "1"),
            "direction": direction,
            "from": f.get("from", "+15017122661"),
            "to": f.get("to", "+15558675310"),
            "date_updated": f.get("date_updated") or sent or created,
            "price": f.get("price"),
            "error_message": f.get("error_message"),
            "uri": base + ".json",
            "account_sid": account_sid,
            "num_media": f.get("num_media", "0"),
            "status": status,
            "messaging_service_sid": f.get("messaging_service_sid"),
            "sid": sid,
            "date_sent": sent,
            "date_created": created,
            "error_code": f.get("error_code"),
            "price_unit": f.get("price_unit", "USD"),
            "api_version": f.get("api_version", API_VERSION),
            "subresource_uris": {"media": base + "/Media.json",
                                 "feedback": base + "/Feedback.json"},
        }
        with self._lock:
            self.messages[sid] = rec
        return dict(rec)

    def update_message(self, sid: str, **fields: Any) -> dict[str, Any]:
        f = _normalise_fields(fields, MESSAGE_FIELDS)
        with self._lock:
            rec = self.messages[sid]
            if "status" in f and f["status"] not in MESSAGE_STATUSES:
                raise ValueError("message status %r" % f["status"])
            now = self._now()
            rec.update(f)
            if ("date_sent" not in f and rec["date_sent"] is None
                    and rec["status"] not in MESSAGE_UNSENT):
                rec["date_sent"] = max(now, rec["date_created"])
            rec["date_updated"] = f.get("date_updated") or max(now, rec["date_created"])
            return dict(rec)

    # ------------------------------------------------------------ recordings
    def add_recording(self, account_sid: str, call_sid: str | None, **fields: Any) -> dict[str, Any]:
        self._require_account(account_sid)
        f = _normalise_fields(fields, RECORDING_FIELDS + ["track"])
        now = self._now()
        status = f.get("status", "completed")
        if status not in RECORDING_STATUSES:
            raise ValueError("recording status %r not in %s" % (status, sorted(RECORDING_STATUSES)))
        source = f.get("source", "DialVerb")
        if source not in RECORDING_SOURCES:
            raise ValueError("recording source %r not in %s" % (source, sorted(RECORDING_SOURCES)))
        sid = f.get("sid") or _hexsid("RE")
        call = self.calls.get(call_sid) if call_sid else None
        start = f.get("start_time") or f.get("date_created") or (call and call["start_time"]) or now
        created = f.get("date_created") or start
        duration = f.get("duration")
        if duration is None:
            duration = "-1" if status == "in-progress" else (
                call["duration"] if call and call["duration"] else "0")
        rec = {
            "account_sid": account_sid,
            "api_version": f.get("api_version", API_VERSION),
            "call_sid": call_sid,
            "conference_sid": f.get("conference_sid"),
            "date_created": created,
            "date_updated": f.get("date_updated") or created,
            "start_time": start,
            "duration": duration,
            "sid": sid,
            "price": f.get("price"),
            "price_unit": f.get("price_unit", "USD"),
            "status": status,
            "channels": int(f.get("channels", 1)),
            "source": source,
            "error_code": f.get("error_code"),
            "uri": "/%s/Accounts/%s/Recordings/%s.json" % (API_VERSION, account_sid, sid),
            "encryption_details": f.get("encryption_details"),
            "subresource_uris": {
                "add_on_results": "/%s/Accounts/%s/Recordings/%s/AddOnResults.json" % (API_VERSION, account_sid, sid),
                "transcriptions": "/%s/Accounts/%s/Recordings/%s/Transcriptions.json" % (API_VERSION, account_sid, sid),
            },
            "media_url": f.get("media_url", "%s/%s/Accounts/%s/Recordings/%s" % (
                REAL_BASE_URL, API_VERSION, account_sid, sid)),
            "track": f.get("track", "both"),
        }
        with self._lock:
            self.recordings[sid] = rec
        return dict(rec)

    def update_recording(self, sid: str, **fields: Any) -> dict[str, Any]:
        f = _normalise_fields(fields, RECORDING_FIELDS + ["track"])
        with self._lock:
            rec = self.recordings[sid]
            rec.update(f)
            rec["date_updated"] = f.get("date_updated") or max(self._now(), rec["date_created"])
            return dict(rec)

    # ------------------------------------------------------------ faults
    def fail_next(self, n: int, status: int, retry_after: Any = None,
                  body: Any = None, path: str | None = None,
                  headers: dict[str, str] | None = None, skip: int = 0) -> None:
        """The next n requests (whose path contains `path`, if given) get
        `status` with Twilio's error body (or `body`: dict -> JSON,
        str/bytes -> sent raw). retry_after sets the Retry-After header.
        skip=k lets the first k matching requests through (e.g. skip=1 on
        "/Calls.json" fails the 2nd page of a listing)."""
        with self._lock:
            self._faults.append(_Fault(n, "status", path, status=status,
                                       retry_after=retry_after, body=body,
                                       headers=headers, skip=skip))

    def malformed_next(self, path: str | None = None, kind: str = "missing_sid",
                       index: int = 0, n: int = 1) -> None:
        """The next n list responses (path substring) carry one malformed item
        at position `index`: kind "missing_sid" (key removed), "bad_date" (the
        primary date field - start_time/date_sent/date_created - set to
        "not-a-date"), "null_date" (it set to null) or "not_object" (item
        replaced by a string). The other items are untouched."""
        if kind not in ("missing_sid", "bad_date", "null_date", "not_object"):
            raise ValueError(kind)
        with self._lock:
            self._faults.append(_Fault(n, "malformed", path, malformed_kind=kind,
                                       index=index))

    def disconnect_next(self, n: int = 1, path: str | None = None) -> None:
        """Close the connection without any response (client sees a
        connection error)."""
        with self._lock:
            self._faults.append(_Fault(n, "disconnect", path))

    def delay_next(self, n: int, seconds: float, path: str | None = None) -> None:
        """Sleep before answering (to exercise client timeouts)."""
        with self._lock:
            self._faults.append(_Fault(n, "delay", path, seconds=seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, kind: str, path: str) -> _Fault | None:
        with self._lock:
            for ft in self._faults:
                if ft.kind == kind and ft.remaining > 0 and ft.matches(path):
                    if ft.skip > 0:
                        ft.skip -= 1
                        return None
                    ft.remaining -= 1
                    if ft.remaining == 0:
                        self._faults.remove(ft)
                    return ft
        return None

    # ------------------------------------------------------------ request log
    def requests_to(self, path_substring: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if path_substring in r.path]

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ------------------------------------------------------------ rendering
    @staticmethod
    def render(rec: dict[str, Any], fields: list[str]) -> dict[str, Any]:
        out = {}
        for k in fields:
            v = rec.get(k)
            if isinstance(v, datetime):
                v = rfc2822(v)
            elif isinstance(v, dict):
                v = dict(v)
            out[k] = v
        return out

    def render_call(self, sid: str) -> dict[str, Any]:
        with self._lock:
            return self.render(self.calls[sid], CALL_FIELDS)

    def render_message(self, sid: str) -> dict[str, Any]:
        with self._lock:
            return self.render(self.messages[sid], MESSAGE_FIELDS)

    def render_recording(self, sid: str, call_scoped: bool = False) -> dict[str, Any]:
        with self._lock:
            rec = self.recordings[sid]
            if call_scoped:
                out = self.render(rec, CALL_RECORDING_FIELDS)
                out["uri"] = "/%s/Accounts/%s/Calls/%s/Recordings/%s.json" % (
                    API_VERSION, rec["account_sid"], rec["call_sid"], sid)
                return out
            return self.render(rec, RECORDING_FIELDS)

    def render_account(self, sid: str) -> dict[str, Any]:
        with self._lock:
            return self.render(self.accounts[sid], ACCOUNT_FIELDS)

    # ------------------------------------------------------------ dispatch
    def _authenticate(self, header: str | None, account_sid: str | None) -> tuple[bool, str | None]:
        if not header or not header.startswith("Basic "):
            return False, None
        try:
            user, _, pw = base64.b64decode(header[6:]).decode("utf-8").partition(":")
        except Exception:
            return False, None
        with self._lock:
            if user.startswith("AC"):
                acct = self.accounts.get(user)
                ok = acct is not None and acct["auth_token"] == pw and acct["status"] == "active"
                owner = user
            else:
                key = self.api_keys.get(user)
                ok = key is not None and key[1] == pw
                owner = key[0] if key else None
            if ok and account_sid is not None and owner != account_sid:
                # Subaccounts: the parent's credentials can read them.
                sub = self.accounts.get(account_sid)
                ok = sub is not None and sub["owner_account_sid"] == owner
        return ok, user

    def handle(self, method: str, path: str, query: list[tuple[str, str]],
               auth_header: str | None) -> tuple[int, dict[str, str], Any, str | None]:
        """Return (status, headers, body, auth_user); body is dict/bytes/str."""
        m = _ACCOUNT_RE.match(path)
        account_sid = m.group(1) if m else None
        ok, user = self._authenticate(auth_header, account_sid)
        if not m:
            if not ok and path.startswith("/%s/" % API_VERSION):
                return 401, {"WWW-Authenticate": 'Basic realm="Twilio API"'}, twilio_error(401), user
            return 404, {}, twilio_error(404, "The requested resource %s was not found" % path), user
        if not ok:
            return 401, {"WWW-Authenticate": 'Basic realm="Twilio API"'}, twilio_error(401), user
        if method != "GET":
            return 405, {"Allow": "GET"}, twilio_error(405), user
        rest = m.group("rest")
        q = dict(query)
        try:
            return self._route(account_sid, rest, path, query, q) + (user,)
        except BadFilter as e:
            return 400, {}, twilio_error(400, "Invalid date filter value: %s" % e, 20001), user

    def _route(self, account_sid: str, rest: str, path: str,
               query: list[tuple[str, str]], q: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        not_found = (404, {}, twilio_error(404, "The requested resource %s was not found" % path))
        if rest == ".json":
            return 200, {}, self.render_account(account_sid)
        if rest == "/Calls.json":
            return 200, {}, self._list_calls(account_sid, path, query, q)
        mm = re.fullmatch(r"/Calls/(CA[0-9a-fA-F]{32})\.json", rest)
        if mm:
            with self._lock:
                c = self.calls.get(mm.group(1))
                if c is None or c["account_sid"] != account_sid:
                    return not_found
                return 200, {}, self.render_call(mm.group(1))
        mm = re.fullmatch(r"/Calls/(CA[0-9a-fA-F]{32})/Recordings\.json", rest)
        if mm:
            with self._lock:
                c = self.calls.get(mm.group(1))
                if c is None or c["account_sid"] != account_sid:
                    return not_found
            return 200, {}, self._list_recordings(account_sid, path, query, q, call_sid=mm.group(1))
        mm = re.fullmatch(r"/Calls/(CA[0-9a-fA-F]{32})/Recordings/(RE[0-9a-fA-F]{32})\.json", rest)
        if mm:
            with self._lock:
                r = self.recordings.get(mm.group(2))
                if r is None or r["account_sid"] != account_sid or r["call_sid"] != mm.group(1):
                    return not_found
                return 200, {}, self.render_recording(mm.group(2), call_scoped=True)
        if rest == "/Messages.json":
            return 200, {}, self._list_messages(account_sid, path, query, q)
        mm = re.fullmatch(r"/Messages/((?:SM|MM)[0-9a-fA-F]{32})\.json", rest)
        if mm:
            with self._lock:
                r = self.messages.get(mm.group(1))
                if r is None or r["account_sid"] != account_sid:
                    return not_found
                return 200, {}, self.render_message(mm.group(1))
        if rest == "/Recordings.json":
            return 200, {}, self._list_recordings(account_sid, path, query, q)
        mm = re.fullmatch(r"/Recordings/(RE[0-9a-fA-F]{32})(\.json|\.mp3|\.wav)?", rest)
        if mm:
            with self._lock:
                r = self.recordings.get(mm.group(1))
                if r is None or r["account_sid"] != account_sid:
                    return not_found
                if mm.group(2) == ".json":
                    return 200, {}, self.render_recording(mm.group(1))
            ctype = "audio/mpeg" if mm.group(2) == ".mp3" else "audio/x-wav"
            return 200, {"Content-Type": ctype}, b"FAKE-AUDIO-" + mm.group(1).encode()
        return not_found

    # ------------------------------------------------------------ lists
    def _date_filters(self, q: dict[str, str], name: str, field_: str, *,
                      le_day: str, lt_strict: bool) -> list[Callable[[dict[str, Any]], bool]]:
        preds = []
        for op in ("=", ">", "<"):
            key = name if op == "=" else name + op
            if key in q and q[key] != "":
                p = make_date_predicate(op, q[key], le_day=le_day,
                                        lt_strict_datetime=lt_strict,
                                        precision=self.datetime_filter_precision)
                preds.append(lambda r, p=p: p(r.get(field_)))
        return preds

    def _list_calls(self, account_sid, path, query, q):
        preds: list[Callable[[dict[str, Any]], bool]] = [lambda r: r["account_sid"] == account_sid]
        for qk, fk in (("To", "to"), ("From", "from"), ("ParentCallSid", "parent_call_sid"),
                       ("Status", "status")):
            if q.get(qk):
                preds.append(lambda r, fk=fk, v=q[qk]: r.get(fk) == v)
        preds += self._date_filters(q, "StartTime", "start_time", le_day="exclusive", lt_strict=True)
        preds += self._date_filters(q, "EndTime", "end_time", le_day="exclusive", lt_strict=True)
        with self._lock:
            items = [r for r in self.calls.values() if all(p(r) for p in preds)]
            items.sort(key=lambda r: (r["start_time"] or r["date_created"], r["date_created"], r["sid"]),
                       reverse=True)
            rendered = [self.render(r, CALL_FIELDS) for r in items]
        return self._paginate("calls", rendered, path, query, q, "start_time")

    def _list_messages(self, account_sid, path, query, q):
        preds: list[Callable[[dict[str, Any]], bool]] = [lambda r: r["account_sid"] == account_sid]
        for qk, fk in (("To", "to"), ("From", "from")):
            if q.get(qk):
                preds.append(lambda r, fk=fk, v=q[qk]: r.get(fk) == v)
        preds += self._date_filters(q, "DateSent", "date_sent", le_day="inclusive", lt_strict=False)
        with self._lock:
            items = [r for r in self.messages.values() if all(p(r) for p in preds)]
            items.sort(key=lambda r: (r["date_sent"] or r["date_created"], r["date_created"], r["sid"]),
                       reverse=True)
            rendered = [self.render(r, MESSAGE_FIELDS) for r in items]
        return self._paginate("messages", rendered, path, query, q, "date_sent")

    def _list_recordings(self, account_sid, path, query, q, call_sid=None):
        preds: list[Callable[[dict[str, Any]], bool]] = [lambda r: r["account_sid"] == account_sid]
        if call_sid:
            preds.append(lambda r: r["call_sid"] == call_sid)
        for qk, fk in (("CallSid", "call_sid"), ("ConferenceSid", "conference_sid")):
            if q.get(qk) and not call_sid:
                preds.append(lambda r, fk=fk, v=q[qk]: r.get(fk) == v)
        if q.get("IncludeSoftDeleted", "").lower() != "true":
            preds.append(lambda r: r["status"] != "deleted")
        preds += self._date_filters(q, "DateCreated", "date_created", le_day="midnight", lt_strict=False)
        with self._lock:
            items = [r for r in self.recordings.values() if all(p(r) for p in preds)]
            items.sort(key=lambda r: (r["date_created"], r["sid"]), reverse=True)
            rendered = [self.render_recording(r["sid"], call_scoped=bool(call_sid)) for r in items]
        return self._paginate("recordings", rendered, path, query, q, "date_created")

    def _paginate(self, key: str, items: list[dict[str, Any]], path: str,
                  query: list[tuple[str, str]], q: dict[str, str], date_field: str) -> dict[str, Any]:
        try:
            size = int(q.get("PageSize") or self.default_page_size)
        except ValueError:
            size = self.default_page_size
        size = max(1, min(self.max_page_size, size))
        try:
            page = max(0, int(q.get("Page") or 0))
        except ValueError:
            page = 0
        token = q.get("PageToken") or ""
        sids = [it["sid"] for it in items]
        if token.startswith("PA") and token[2:] in sids:
            i = sids.index(token[2:]) + 1
            chunk_start = i
        elif token.startswith("PB") and token[2:] in sids:
            j = sids.index(token[2:])
            chunk_start = max(0, j - size)
        else:
            chunk_start = page * size
        chunk = items[chunk_start:chunk_start + size]
        has_more = chunk_start + size < len(items)
        has_prev = chunk_start > 0 and bool(items)

        filters = [(k, v) for k, v in query if k not in ("PageSize", "Page", "PageToken")]

        def uri(extra: list[tuple[str, str]]) -> str:
            return path + "?" + urlencode(filters + [("PageSize", str(size))] + extra)

        current = [("Page", str(page))] + ([("PageToken", token)] if token else [])
        start = page * size
        body = {
            key: chunk,
            "end": start + len(chunk) - 1 if chunk else 0,
            "first_page_uri": uri([("Page", "0")]),
            "next_page_uri": uri([("Page", str(page + 1)), ("PageToken", "PA" + chunk[-1]["sid"])])
            if has_more and chunk else None,
            "page": page,
            "page_size": size,
            "previous_page_uri": uri([("Page", str(max(0, page - 1))), ("PageToken", "PB" + chunk[0]["sid"])])
            if has_prev and chunk else None,
            "start": start,
            "uri": uri(current),
        }
        ft = self._take_fault("malformed", path)
        if ft is not None and chunk:
            idx = min(ft.index, len(chunk) - 1)
            item = dict(chunk[idx])
            if ft.malformed_kind == "missing_sid":
                item.pop("sid", None)
            elif ft.malformed_kind == "bad_date":
                item[date_field] = "not-a-date"
            elif ft.malformed_kind == "null_date":
                item[date_field] = None
            else:
                item = "garbage"
            chunk[idx] = item
        return body


def _normalise_fields(fields: dict[str, Any], allowed: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in fields.items():
        k2 = "from" if k in ("from_", "from") else k
        if k2 not in allowed:
            raise TypeError("unknown field %r (spec fields: %s)" % (k, ", ".join(allowed)))
        if k2 in DATETIME_FIELDS:
            v = _utc(v)
        elif k2 in STRING_NUMBER_FIELDS and v is not None and not isinstance(v, str):
            v = str(v)
        out[k2] = v
    return out


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTwilio = None  # type: ignore[assignment]
    protocol_version = "HTTP/1.0"
    server_version = "FakeTwilio/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    def _serve(self) -> None:
        fake = self.fake
        parts = urlsplit(self.path)
        path = parts.path
        query = parse_qsl(parts.query, keep_blank_values=True)
        rec = RecordedRequest(
            method=self.command, path=path, query=dict(query), raw_query=parts.query,
            time=datetime.now(UTC), headers={k: v for k, v in self.headers.items()})
        with fake._lock:
            fake.requests.append(rec)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

        ft = fake._take_fault("delay", path)
        if ft is not None:
            time.sleep(ft.seconds)
        if fake._take_fault("disconnect", path) is not None:
            rec.status = -1
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        headers: dict[str, str] = {}
        ft = fake._take_fault("status", path)
        if ft is not None:
            status = ft.status
            body = ft.body if ft.body is not None else twilio_error(status)
            if ft.retry_after is not None:
                headers["Retry-After"] = str(ft.retry_after)
            if status == 401:
                headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            headers.update(ft.headers or {})
            user = None
        else:
            try:
                status, headers, body, user = fake.handle(
                    self.command, path, query, self.headers.get("Authorization"))
            except Exception as e:  # a bug in the fake -> Twilio-shaped 500
                status, headers, body, user = 500, {}, twilio_error(500, "fake error: %r" % e), None
        rec.status = status
        rec.auth_user = user
        if isinstance(body, (dict, list)):
            payload = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        elif isinstance(body, str):
            payload = body.encode("utf-8")
            headers.setdefault("Content-Type", "text/html; charset=utf-8")
        else:
            payload = body
            headers.setdefault("Content-Type", "application/octet-stream")
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Twilio-Request-Id", _hexsid("RQ"))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = do_PUT = do_HEAD = _serve


# ---------------------------------------------------------------- clients

def rewrite_url(url: str, base_url: str) -> str:
    """https://api.twilio.com/2010-04-01/... -> http://127.0.0.1:PORT/2010-04-01/..."""
    u = urlsplit(url)
    b = urlsplit(base_url)
    if u.hostname and (u.hostname == "twilio.com" or u.hostname.endswith(".twilio.com")):
        return urlunsplit((b.scheme, b.netloc, u.path, u.query, u.fragment))
    return url


def _base(target: Any) -> str:
    return target.base_url if hasattr(target, "base_url") else str(target)


try:
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.http.http_client import TwilioHttpClient
except ImportError:  # pragma: no cover - twilio is a project dependency
    TwilioHttpClient = object  # type: ignore[misc,assignment]
    AsyncTwilioHttpClient = object  # type: ignore[misc,assignment]


class FakeTwilioHttpClient(TwilioHttpClient):  # type: ignore[misc]
    """TwilioHttpClient that sends every *.twilio.com request to `target`
    (a FakeTwilio or a base URL string)."""

    def __init__(self, target: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._target = target
        if self.session is not None:
            self.session.trust_env = False

    def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        return super().request(method, rewrite_url(url, _base(self._target)), *args, **kwargs)


class FakeAsyncTwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """AsyncTwilioHttpClient (aiohttp) redirected the same way. Construct it
    inside a running event loop and `await .close()` when done."""

    def __init__(self, target: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._target = target

    async def request(self, method, url, *args, **kwargs):  # type: ignore[override]
        return await super().request(method, rewrite_url(url, _base(self._target)), *args, **kwargs)


def client_for(fake: Any, account_sid: str, auth_token: str, /, **client_kwargs: Any):
    """Real twilio.rest.Client talking to the fake. For API-key auth pass
    (key_sid, secret) as (account_sid, auth_token) and account_sid=AC... in
    client_kwargs."""
    from twilio.rest import Client
    client_kwargs.setdefault("environment", {"FAKE_TWILIO": "1"})  # ignore TWILIO_* env
    return Client(account_sid, auth_token,
                  http_client=FakeTwilioHttpClient(fake), **client_kwargs)


def async_client_for(fake: Any, account_sid: str, auth_token: str, /, **client_kwargs: Any):
    """Async variant; call inside a running loop; `await
    client.http_client.close()` afterwards."""
    from twilio.rest import Client
    client_kwargs.setdefault("environment", {"FAKE_TWILIO": "1"})
    return Client(account_sid, auth_token,
                  http_client=FakeAsyncTwilioHttpClient(fake), **client_kwargs)
