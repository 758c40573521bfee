"""Twilio accounts: every call and every SMS/MMS/WhatsApp message, as records.

Reading. Twilio lists come newest first and filter by whole UTC days
(``StartTime>=YYYY-MM-DD`` for calls, ``DateSent>=YYYY-MM-DD`` for
messages). Each pass over a list reads the window from now back to the
saved cursor minus ``lookback``: the day filter bounds the query, and paging
stops at the first item older than the window, so a busy account costs the
pages that are new, not the whole day again. Items inside the window are
read again at every pass; records are upserted by SID, so a price that
arrives later, a message that goes from sent to delivered or a recording
added after the call simply update the record in place.

A call becomes a record once it has ended; one still ringing or in
progress is left out and holds the list's cursor back, so later passes read
it again until Twilio reports a final status. The cursor and the resumable
pass are described in ``twilio_window``; the JSON-to-record mapping is the
pure ``twilio_records``.

Calls are one record per conversation: child legs (``parent_call_sid`` set,
e.g. the <Dial> to an agent or a forward) join their parent's record.
Recordings come from the account's Recordings list, read alongside the calls
(newest first, by ``DateCreated``): one request per page of recordings
instead of one per call, which matters because every call in the window is
re-read at every pass.

The ``twilio`` client is blocking; each connector drives it from one thread
of its own, so the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
import structlog
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from commsync.config.models import TWILIO_BASE_URL, TwilioAccountConfig

from .base import Batch, CredentialsRefused, MalformedItem, RemoteItem, TemporarilyUnavailable, describe
from .twilio_records import Call, Malformed, Options, call_record, message_record, parse_call, parse_time, unreadable_numbers
from .twilio_window import MAX_CALL, Conversation, LegGroups, Window

log = structlog.get_logger(__name__)

RATE_LIMIT_RETRIES = 4
# How long a notice stays in `problems` after it was seen.
NOTICE_S = 24 * 3600.0
RATE_LIMIT_MAX_WAIT = 120.0


class PermissionDenied(CredentialsRefused):
    """HTTP 403: the credentials are valid but may not read this resource (a Standard or Restricted API key)."""


class TwilioUnavailable(TemporarilyUnavailable):
    """Twilio did not answer usefully (5xx, connection, repeated 429): the runner backs off and retries."""


# -- talking to Twilio ----------------------------------------------------------------------


class _RebasingHttpClient(TwilioHttpClient):
    """Sends requests for api.twilio.com to ``base_url`` instead (an API proxy, the tests' fake)."""

    def __init__(self, base_url: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._base = base_url.rstrip("/")
        if self._base.startswith("http://") and self.session is not None:
            # Plain http is allowed to this machine only: an HTTP_PROXY from the
            # environment would carry the Basic auth credentials off it in clear text.
            self.session.trust_env = False

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        if parts.hostname and parts.hostname.endswith("twilio.com"):
            url = self._base + parts.path + (f"?{parts.query}" if parts.query else "")
        return super().request(method, url, *args, **kwargs)


def _payload(page: Any, key: str) -> tuple[list[Any], bool]:
    """The items of a list page as Twilio sent them, and whether a next page exists.

    The client's typed instances turn an unparseable date into None and fail
    outright on an item that is not an object; the page's JSON keeps what
    Twilio sent, so normalization stays a pure function of Twilio's
    documented JSON and a bad item costs that item only.
    """
    payload = getattr(page, "_payload", None)
    if not isinstance(payload, Mapping):
        raise TwilioUnavailable("list page without a JSON object")
    items = payload.get(key)
    return (items if isinstance(items, list) else []), bool(payload.get("next_page_uri"))


def _call_json(instance: Any) -> dict[str, Any]:
    """A fetched CallInstance back in the list's JSON shape (dates may stay datetimes)."""
    return {
        "sid": instance.sid,
        "parent_call_sid": instance.parent_call_sid,
        "from": instance._from,
        "to": instance.to,
        "status": instance.status,
        "direction": instance.direction,
        "start_time": instance.start_time,
        "duration": instance.duration,
        "price": instance.price,
        "price_unit": instance.price_unit,
    }


def _retry_after(headers: Mapping[str, Any] | None) -> float | None:
    value = (headers or {}).get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError, IndexError):
            return None


def _error_detail(text: str | None) -> str:
    """Twilio's error code and message, from its JSON error body."""
    try:
        body = json.loads(text or "")
    except ValueError:
        return ""
    if not isinstance(body, Mapping):
        return ""
    code, message = body.get("code"), body.get("message")
    return f", Twilio code {code}: {message}" if code or message else ""


class Pager:
    """Pages of one list, newest first, followed by ``next_page_uri``; nothing is fetched unasked."""

    def __init__(self, request: Callable[[Callable[[], Any]], Any], first: Callable[[], Any], key: str):
        self._request = request
        self._first: Callable[[], Any] | None = first
        self._key = key
        self._page: Any = None
        self._more = True
        self._pending: asyncio.Future[Any] | None = None

    async def next(self) -> tuple[list[Any], bool] | None:
        """The next page's (items, has_next), or None after the last page."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._page = await pending
        elif self._first is not None:
            first, self._first = self._first, None
            self._page = await self._request(first)
        elif self._more:
            self._page = await self._request(self._page.next_page)
        else:
            return None
        items, self._more = _payload(self._page, self._key)
        return items, self._more

    def prefetch(self) -> None:
        """Start fetching the next page now (the caller has decided it wants it)."""
        if self._more and self._pending is None and self._first is None:
            self._pending = asyncio.ensure_future(self._request(self._page.next_page))

    async def aclose(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
            self._pending = None


class _Verify:
    """`commsync verify` and `--repair` for a Twilio account: mixed into TwilioConnector."""

    async def inventory(self: TwilioConnector, stream: str, checkpoint: Mapping[str, Any]) -> list[RemoteItem]:
        """Every SID of ``stream`` (``calls`` or ``messages``) from ``since`` to the checkpoint's cursor.

        Child legs, calls that never started and messages not sent yet never
        become records of their own: they are listed as excluded, with why.
        """
        cursor = _cursor(checkpoint)
        if cursor is None:
            return []
        account = await self._call(self._account)
        key = "start_time" if stream == "calls" else "date_sent"
        query: dict[str, Any] = {"page_size": 1000, f"{key}_before": (cursor.date() + timedelta(days=1)).isoformat()}
        if self.config.since is not None:
            query[f"{key}_after"] = self.config.since.isoformat()
        resource = getattr(account, stream)
        pages = self._pager(f"list {stream}", lambda: resource.page(**query), stream)
        items: list[RemoteItem] = []
        try:
            while (page := await pages.next()) is not None:
                pages.prefetch()
                for raw in page[0]:
                    item = _remote_item(stream, raw, cursor)
                    if item is not None:
                        items.append(item)
        finally:
            await pages.aclose()
        return items

    async def refetch(
        self: TwilioConnector, stream: str, checkpoint: Mapping[str, Any] | None, items: Sequence[tuple[Any, Mapping[str, Any]]]
    ) -> AsyncIterator[Batch]:
        """The calls or messages ``items`` (SIDs), each read by itself, as records."""
        account = await self._call(self._account)
        records, bad, found = [], [], []
        for sid, _ in items:
            try:
                record = await (self._refetch_call(account, sid) if stream == "calls" else self._refetch_message(sid))
            except Malformed as exc:
                bad.append(MalformedItem(str(exc), item_id=sid, stream=stream))
                continue
            if record is not None:
                records.append(record)
                found.append(sid)
        yield Batch(stream, records, {}, malformed=bad, item_ids=found)

    async def _refetch_message(self: TwilioConnector, sid: str) -> dict[str, Any] | None:
        raw = await self._get_json("fetch message", f"Messages/{sid}.json")
        return message_record(raw, self.options) if raw is not None else None

    async def _refetch_call(self: TwilioConnector, account: Any, sid: str) -> dict[str, Any] | None:
        raw = await self._get_json("fetch call", f"Calls/{sid}.json")
        if raw is None:
            return None
        root = parse_call(raw)
        if root.start is None or root.parent:
            return None  # never started, or a leg: not a record of its own
        legs = [call async for call in self._children(account, sid)]
        page = await self._request("list recordings", lambda: account.recordings.page(call_sid=sid, page_size=100))
        own = [r for r in _payload(page, "recordings")[0] if isinstance(r, Mapping)]
        conv = Conversation(root, legs, own)
        if not conv.ended:
            return None
        return call_record(root, legs, own, self.options)

    async def _get_json(self: TwilioConnector, what: str, path: str) -> dict[str, Any] | None:
        """One resource of the account as Twilio's JSON (None when it does not exist).

        Its errors go through `_request` as a list page's do: 401/403 drop the
        client (the secret is read again), 429 waits and tries again, the rest
        carries Retry-After to the runner.
        """
        url = f"https://api.twilio.com/2010-04-01/Accounts/{self.config.account_sid}/{path}"

        def get() -> Any:
            self._account()  # the client, made anew after a refusal dropped it; its HTTP client is the (rebased) one
            response = self._client.request("GET", url)  # type: ignore[union-attr]
            if getattr(response, "status_code", None) != 200:
                raise TwilioException("Unable to fetch resource", response)  # as a failed list page: status and headers kept
            return response

        response = await self._request(what, get, missing_ok=True)
        if response is None:
            return None
        try:
            body = json.loads(response.text)
        except ValueError:
            raise TwilioUnavailable(f"{what}: unreadable response") from None
        if not isinstance(body, dict):
            raise Malformed("not an object")
        return body


def _cursor(checkpoint: Mapping[str, Any]) -> datetime | None:
    value = checkpoint.get("cursor")
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _remote_item(stream: str, raw: Any, cursor: datetime) -> RemoteItem | None:
    """What verify needs of one list item; None when it lies beyond the cursor (not synced yet)."""
    sid = raw.get("sid") if isinstance(raw, Mapping) else None
    if not isinstance(sid, str):
        return RemoteItem(None, label="an item without a SID", excluded="unreadable: no SID")
    try:
        if stream == "calls":
            call = parse_call(raw)
            if call.start is not None and call.start > cursor:
                return None
            if call.parent:
                return RemoteItem(sid, label=sid, excluded=f"a leg of {call.parent}: in that call's record")
            if call.start is None:
                return RemoteItem(sid, label=sid, excluded="never started (canceled or failed while queued)")
            return RemoteItem(sid, record_id=sid, label=sid)
        sent = parse_time(raw.get("date_sent"), "date_sent")
        if sent is None:
            return RemoteItem(sid, label=sid, excluded="not sent yet")
        if sent > cursor:
            return None
        return RemoteItem(sid, record_id=sid, label=sid)
    except Malformed:
        # Unreadable items are the quarantine's: expected as a record, found there or missing.
        return RemoteItem(sid, record_id=sid, label=sid)


class TwilioConnector(_Verify):
    """One configured Twilio account."""

    kind = "twilio"

    def __init__(self, config: TwilioAccountConfig, *, default_region: str | None = None, max_content_chars: int = 100_000):
        self.config = config
        self.name = config.name
        self.options = Options(
            source=config.name,
            account_sid=config.account_sid,
            region=default_region,
            own_numbers=frozenset(config.numbers),
            max_content_chars=max_content_chars,
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"twilio-{config.name}")
        self._client: Client | None = None
        self._log = log.bind(source=self.name)
        # Things to show in `commsync status` for a day: key -> (text, monotonic time seen).
        self._notices: dict[str, tuple[str, float]] = {}
        self._sleep = asyncio.sleep

    @property
    def problems(self) -> dict[str, str]:
        """What is wrong without failing the account (a cursor found in the future), for a day after it was seen."""
        now = time.monotonic()
        return {key: text for key, (text, seen) in self._notices.items() if now - seen < NOTICE_S}

    # -- plumbing -------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    def _account(self) -> Any:
        if self._client is None:
            username, password = self.config.read_credentials()
            timeout = self.config.timeout.total_seconds()
            # Only another base_url is rewritten: Twilio's own edge/region routing (TWILIO_EDGE) stays intact.
            if self.config.base_url == TWILIO_BASE_URL:
                http = TwilioHttpClient(timeout=timeout)
            else:
                http = _RebasingHttpClient(self.config.base_url, timeout=timeout)
            self._client = Client(username, password, account_sid=self.config.account_sid, http_client=http)
        return self._client.api.v2010.accounts(self.config.account_sid)

    def _drop(self) -> None:
        client, self._client = self._client, None
        session = getattr(getattr(client, "http_client", None), "session", None)
        if session is not None:
            session.close()

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._drop)
        self._thread.shutdown(wait=False)

    async def _request(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One API request in the connector's thread, with Twilio's errors turned into ours.

        429 is Twilio pacing us, not a failure: it is retried here after
        Retry-After (or a short jittered wait), so the pass goes on from the
        same page. Only repeated 429s, 5xx and network errors reach the
        runner, whose backoff (with jitter) retries the pass from its
        checkpoint. 401/403 raise CredentialsRefused: retrying soon will not help.
        """
        for attempt in range(RATE_LIMIT_RETRIES + 1):
            try:
                return await self._call(fn, *args, **kwargs)
            except TwilioRestException as exc:  # a fetch: no headers survive
                status, headers, detail = exc.status, None, f", Twilio code {exc.code}: {exc.msg}"
            except TwilioException as exc:  # a list page: ("Unable to fetch page", response)
                response = exc.args[1] if len(exc.args) > 1 else None
                status = getattr(response, "status_code", None)
                headers = getattr(response, "headers", None)
                detail = _error_detail(getattr(response, "text", None))
                if status is None:
                    raise TwilioUnavailable(f"{what}: {exc}") from None
            except requests.RequestException as exc:
                raise TwilioUnavailable(f"{what}: {describe(exc)}") from None
            except ValueError as exc:  # a 200 whose body is not JSON (a proxy's error page)
                raise TwilioUnavailable(f"{what}: unreadable response: {describe(exc)}") from None
            if status in (401, 403):
                self._drop()  # the next attempt re-reads the secret (it may have been rotated)
                refused = CredentialsRefused if status == 401 else PermissionDenied
                reason = "credentials refused" if status == 401 else "permission denied"
                raise refused(f"{what}: {reason} for account {self.config.account_sid} (HTTP {status}{detail})")
            if status == 404 and missing_ok:
                return None
            if status == 429 and attempt < RATE_LIMIT_RETRIES:
                wait = _retry_after(headers)
                if wait is None:
                    wait = random.uniform(0.5, 1.0) * 2**attempt
                wait = min(wait, RATE_LIMIT_MAX_WAIT)
                self._log.warning("rate_limited", request=what, wait_s=round(wait, 3), attempt=attempt + 1)
                await self._sleep(wait)
                continue
            raise TwilioUnavailable(f"{what}: HTTP {status}{detail}", retry_after=_retry_after(headers) if status in (429, 503) else None)
        raise AssertionError("unreachable")

    # -- check ------------------------------------------------------------------------------

    async def check(self) -> str:
        """One cheap authenticated request: fetch the Account.

        Standard and Restricted API keys may not read the Account resource
        (Twilio answers 403); then one single-item page of each configured
        list proves what commsync needs instead.
        """
        account = await self._call(self._account)
        try:
            info = await self._request("fetch account", account.fetch)
            return f"account ok: {info.friendly_name!r} ({info.status}, {info.type}); reading {', '.join(self.config.channels)}"
        except PermissionDenied:
            pass
        account = await self._call(self._account)
        lists = {"calls": account.calls, "messages": account.messages}
        for name in self.config.channels:
            await self._request(f"list {name}", lists[name].page, page_size=1)
        return f"credentials ok (key may not read the Account resource); {', '.join(self.config.channels)} readable"

    # -- sync -------------------------------------------------------------------------------

    async def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        """Every new or changed call and message since ``state``, a page at a time."""
        for stream in self.config.channels:
            passes = self._calls if stream == "calls" else self._messages
            async for batch in passes(state.get(stream)):
                yield batch

    def _pager(self, what: str, first: Callable[[], Any], key: str) -> Pager:
        return Pager(lambda fn: self._request(what, fn), first, key)

    def _skip(self, stream: str, item: Any, reason: str) -> MalformedItem:
        """Log an item that cannot become a record; the batch hands it on for quarantine."""
        sid = item.get("sid") if isinstance(item, Mapping) else None
        self._log.warning("item_skipped", list=stream, sid=sid, reason=reason)
        return MalformedItem(reason, item_id=sid if isinstance(sid, str) else None, stream=stream)

    def _note_numbers(self, record: Mapping[str, Any]) -> None:
        for address in unreadable_numbers(record):
            self._log.info("number_kept_as_written", sid=record["_id"], number=address)

    async def _open(self, list_name: str, date_filter: str, checkpoint: Mapping[str, Any] | None) -> tuple[Window, Any, Any]:
        """The window to read, the account, and a call that fetches the list's first page within it."""
        window = Window.open(checkpoint, since=self.config.since, lookback=self.config.lookback, now=datetime.now(UTC))
        if window.discarded is not None:
            text = (
                f"list {list_name}: the saved cursor {window.discarded.isoformat()} lies in the future (a restored database, "
                "a wrong clock): read again from the start"
            )
            self._log.warning("cursor_in_future", list=list_name, cursor=window.discarded.isoformat())
            self._notices[f"cursor:{list_name}"] = (text, time.monotonic())
        after, before = window.day_filters()
        query = {"page_size": self.config.page_size, f"{date_filter}_after": after, f"{date_filter}_before": before}
        query = {k: v for k, v in query.items() if v is not None}
        account = await self._call(self._account)
        resource = getattr(account, list_name)
        return window, account, lambda: resource.page(**query)

    async def _messages(self, checkpoint: Mapping[str, Any] | None) -> AsyncIterator[Batch]:
        window, account, first = await self._open("messages", "date_sent", checkpoint)
        pages = self._pager("list messages", first, "messages")
        try:
            while (page := await pages.next()) is not None:
                items, more = page
                records, bad, edge = [], [], False
                for item in items:
                    try:
                        record = message_record(item, self.options)
                    except Malformed as exc:
                        bad.append(self._skip("messages", item, str(exc)))
                        continue
                    if record is None:
                        continue  # not sent yet: it gets a date_sent, and a place in the window, when it is
                    place = window.place(record["occurred_at"])
                    if place == "older":
                        edge = True
                    elif place != "done":  # "edge" too: the same second may not all have been stored
                        self._note_numbers(record)
                        records.append(record)
                self._log.info("page_read", list="messages", items=len(items), records=len(records), malformed=len(bad))
                if edge or not more:
                    yield Batch("messages", records, window.finished(), malformed=bad)
                    self._log.info("pass_done", list="messages", **window.finished())
                    return
                # The next page travels while this one is stored.
                pages.prefetch()
                if records or bad or window.oldest is not None:
                    yield Batch("messages", records, window.progress(), malformed=bad)
        finally:
            await pages.aclose()

    async def _calls(self, checkpoint: Mapping[str, Any] | None) -> AsyncIterator[Batch]:
        window, account, first = await self._open("calls", "start_time", checkpoint)
        recordings = RecordingFeed(self, account, window)
        legs = LegGroups()
        pages = self._pager("list calls", first, "calls")
        try:
            while (page := await pages.next()) is not None:
                items, more = page
                roots, bad, edge = [], [], False
                for item in items:
                    try:
                        call = parse_call(item)
                    except Malformed as exc:
                        bad.append(self._skip("calls", item, str(exc)))
                        continue
                    if call.start is None:
                        continue  # never started (queued, or canceled before it rang): no conversation
                    place = window.place(call.start)
                    if place == "older":
                        edge = True
                    elif call.parent:
                        legs.add(call)
                    elif place == "done":
                        legs.take(call.sid)  # stored with its legs before the pass was interrupted
                    else:
                        roots.append(Conversation(call, legs.take(call.sid), incomplete=place == "edge"))
                done = edge or not more
                if done:
                    roots += await self._orphans(account, legs.orphans())
                records, more_bad = await self._call_records(account, roots, recordings, window)
                bad += more_bad
                self._log.info("page_read", list="calls", items=len(items), records=len(records), malformed=len(bad))
                if done:
                    yield Batch("calls", records, window.finished(), malformed=bad)
                    self._log.info("pass_done", list="calls", **window.finished())
                    return
                pages.prefetch()
                # A resumed pass reads its day again down to where it stopped: nothing to store or checkpoint there.
                if records or bad or window.oldest is not None:
                    yield Batch("calls", records, window.progress(legs.newest()), malformed=bad)
                recordings.forget(window.oldest, keep=legs.sids())
        finally:
            await pages.aclose()
            await recordings.aclose()

    async def _call_records(
        self, account: Any, conversations: list[Conversation], recordings: RecordingFeed, window: Window
    ) -> tuple[list[dict[str, Any]], list[MalformedItem]]:
        """Records of the conversations that have ended; open ones hold the cursor instead."""
        ended = []
        for conv in conversations:
            if conv.incomplete:
                listed = [call async for call in self._children(account, conv.root.sid)]
                conv.legs = list({leg.sid: leg for leg in [*listed, *conv.legs]}.values())
            if conv.ended:
                ended.append(conv)
            elif not window.hold_at(conv.root.start):
                self._log.warning("call_open_too_long", sid=conv.root.sid, status=conv.root.status, start=str(conv.root.start))
        if ended:
            await recordings.read_down_to(min(conv.root.start for conv in ended))
        records, bad = [], []
        for conv in ended:
            recs = [*recordings.of(conv.sids()), *conv.recordings]
            try:
                record = call_record(conv.root, conv.legs, recs, self.options)
            except Malformed as exc:
                bad.append(self._skip("calls", conv.root.raw, str(exc)))
                continue
            self._note_numbers(record)
            records.append(record)
        return records, bad

    async def _orphans(self, account: Any, orphans: Mapping[str, list[Call]]) -> list[Conversation]:
        """Conversations whose legs were read but whose parent started before the window.

        Rare (a call straddling the window's edge), so the parent is fetched
        with all its legs and recordings: the record must stay complete, not
        be overwritten with the legs this pass happened to see.
        """
        out = []
        for parent_sid, seen in orphans.items():
            root = await self._fetch_call(account, parent_sid)
            # A leg of a leg: climb to the conversation's first call.
            for _ in range(3):
                if root is None or not root.parent:
                    break
                root = await self._fetch_call(account, root.parent)
            if root is None or root.start is None:
                self._log.warning("item_skipped", list="calls", sid=parent_sid, reason="parent call of legs not found")
                continue
            listed = [call async for call in self._children(account, root.sid)]
            legs = {leg.sid: leg for leg in [*listed, *seen] if leg.sid != root.sid}
            # The account's Recordings list filtered by call: the permission the feed needs anyway.
            page = await self._request("list recordings", lambda sid=root.sid: account.recordings.page(call_sid=sid, page_size=100))
            own = [r for r in _payload(page, "recordings")[0] if isinstance(r, Mapping)]
            out.append(Conversation(root, list(legs.values()), own))
        return out

    async def _fetch_call(self, account: Any, sid: str) -> Call | None:
        instance = await self._request("fetch call", lambda: account.calls(sid).fetch(), missing_ok=True)
        if instance is None:
            return None
        try:
            return parse_call(_call_json(instance))
        except Malformed as exc:
            self._skip("calls", {"sid": sid}, str(exc))
            return None

    async def _children(self, account: Any, parent_sid: str) -> AsyncIterator[Call]:
        first = lambda: account.calls.page(parent_call_sid=parent_sid, page_size=self.config.page_size)  # noqa: E731
        pages = self._pager("list call legs", first, "calls")
        try:
            while (page := await pages.next()) is not None:
                for item in page[0]:
                    try:
                        yield parse_call(item)
                    except Malformed as exc:
                        self._skip("calls", item, str(exc))
        finally:
            await pages.aclose()


class RecordingFeed:
    """The account's recordings, read newest first alongside the calls and kept by call SID.

    A recording is created after its call starts, so once the feed has read
    every recording created at or after a call's start it holds all of that
    call's recordings. One request serves a page of recordings for many
    calls; the feed is only read when there are ended calls to describe.
    """

    def __init__(self, connector: TwilioConnector, account: Any, window: Window):
        self._connector = connector
        self._account = account
        # Recordings of calls below a resume point were created within a call's length of it.
        after, before = window.day_filters(reach=MAX_CALL)
        # Recordings are small and are not batches: Twilio's largest page costs the fewest requests.
        query: dict[str, Any] = {"page_size": 1000}
        if after:
            query["date_created_after"] = after
        if before:
            query["date_created_before"] = before
        self._query = query
        self._pages: Pager | None = None
        self._exhausted = False
        self._oldest: datetime | None = None
        self._by_call: dict[str, list[dict[str, Any]]] = {}

    async def read_down_to(self, t: datetime) -> None:
        """Read until every recording created at or after ``t`` is in hand."""
        while not self._exhausted and (self._oldest is None or self._oldest >= t):
            if self._pages is None:
                first = lambda: self._account.recordings.page(**self._query)  # noqa: E731
                self._pages = self._connector._pager("list recordings", first, "recordings")
            page = await self._pages.next()
            if page is None:
                self._exhausted = True
                return
            items, more = page
            for item in items:
                self._add(item)
            self._exhausted = not more or not items

    def _add(self, item: Any) -> None:
        if not isinstance(item, Mapping) or not isinstance(item.get("call_sid"), str) or not isinstance(item.get("sid"), str):
            self._connector._log.info("recording_ignored", sid=item.get("sid") if isinstance(item, Mapping) else None)
            return
        try:
            created = parse_time(item.get("date_created"), "date_created")
        except Malformed:
            created = None
        if created is not None and (self._oldest is None or created < self._oldest):
            self._oldest = created
        self._by_call.setdefault(item["call_sid"], []).append({**item, "date_created": created})

    def of(self, call_sids: Iterable[str]) -> list[dict[str, Any]]:
        """Recordings of these calls (a conversation's parent and legs)."""
        out: list[dict[str, Any]] = []
        for sid in call_sids:
            out += self._by_call.get(sid, ())
        return out

    def forget(self, oldest_call: datetime | None, *, keep: set[str]) -> None:
        """Drop recordings no call still to come can own: those created more than a call's length after ``oldest_call``."""
        if oldest_call is None:
            return
        limit = oldest_call + MAX_CALL
        for call_sid in list(self._by_call):
            if call_sid in keep:
                continue
            recs = [r for r in self._by_call[call_sid] if (r["date_created"] or limit) <= limit]
            if recs:
                self._by_call[call_sid] = recs
            else:
                del self._by_call[call_sid]

    async def aclose(self) -> None:
        if self._pages is not None:
            await self._pages.aclose()


def build(config: TwilioAccountConfig, ctx: Any) -> TwilioConnector:
    """The connector of one configured Twilio account (see connectors/registry.py)."""
    settings = ctx.settings
    return TwilioConnector(config, default_region=settings.default_region, max_content_chars=settings.capture.max_content_chars)
