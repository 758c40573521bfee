"""`commsync demo` with calls and texts: bundled Twilio pages, replayed on 127.0.0.1, read by the real connector."""

from __future__ import annotations

import io
import json
import re
import socket
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import parse_qsl, urlsplit

import pytest

from commsync.connectors.phones import to_e164
from commsync.connectors.twilio_records import duration_text
from commsync.daemon.demo import TWILIO_SOURCE, demo_files, import_demo, run_demo, twilio_pages
from commsync.daemon.replay import Replay, ReplayServer

from twilio_fake import (
    CALL_DIRECTIONS,
    CALL_FIELDS,
    CALL_STATUSES,
    MESSAGE_DIRECTIONS,
    MESSAGE_FIELDS,
    MESSAGE_STATUSES,
    RECORDING_FIELDS,
    RECORDING_SOURCES,
    RECORDING_STATUSES,
)

ENVELOPE = {"end", "first_page_uri", "next_page_uri", "page", "page_size", "previous_page_uri", "start", "uri"}


def bundled() -> dict[str, list[dict]]:
    pages = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in twilio_pages()}
    return {name: page[name] for name, page in pages.items()}


def customers() -> list[dict]:
    return json.loads(demo_files()[1].read_text(encoding="utf-8"))


def table(text: str) -> dict[str, dict[str, str]]:
    """The demo's table as {customer id: {column: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("customer "))
    head = re.split(r"\s{2,}", lines[start].strip())
    rows = {}
    for line in lines[start + 2 :]:
        cells = dict(zip(head, re.split(r"\s{2,}", line.strip()), strict=True))
        rows[re.search(r"\(([^()]+)\)$", cells["customer"]).group(1)] = cells
    return rows


def expected_phone_contacts() -> dict[str, dict[str, int]]:
    """From the bundled pages and customers alone: each customer's calls, SMS, WhatsApp and talk seconds."""
    owner = {to_e164(phone): c["_id"] for c in customers() for phone in c.get("phones", [])}
    out = {c["_id"]: Counter() for c in customers()}
    data = bundled()
    for call in data["calls"]:
        if call["parent_call_sid"] is None:
            customer = owner.get(call["to"] if call["direction"].startswith("outbound") else call["from"])
            if customer:
                out[customer]["call"] += 1
                out[customer]["talk"] += int(call["duration"] or 0)
    for msg in data["messages"]:
        theirs = msg["to"] if msg["direction"].startswith("outbound") else msg["from"]
        customer = owner.get(to_e164(theirs))
        if customer:
            out[customer]["whatsapp" if theirs.startswith("whatsapp:") else "sms"] += 1
    return out


async def test_demo_table_shows_calls_texts_and_talk_time_per_customer():
    out = io.StringIO()
    assert await run_demo(out) == 0
    text = out.getvalue()
    assert "nothing is kept" in text and "FAILED" not in text
    rows = table(text)
    expected = expected_phone_contacts()
    assert set(rows) == {c["_id"] for c in customers()}
    for cid, want in expected.items():
        row = rows[cid]
        assert (row["calls"], row["sms"], row["whatsapp"]) == (str(want["call"]), str(want["sms"]), str(want["whatsapp"])), cid
        assert row["talk time"] == (duration_text(want["talk"]) if want["call"] else "-"), cid
        assert int(row["total"]) == sum(int(row[c]) for c in ("email", "calls", "sms", "whatsapp")), cid
    # The sample has every kind: a customer with calls, one with SMS, one with WhatsApp.
    assert all(any(want[ch] for want in expected.values()) for ch in ("call", "sms", "whatsapp"))
    data = bundled()
    calls = sum(1 for c in data["calls"] if c["parent_call_sid"] is None)
    whatsapp = sum(1 for m in data["messages"] if m["from"].startswith("whatsapp:"))
    assert f"Twilio: {calls} calls, {len(data['messages']) - whatsapp} SMS, {whatsapp} WhatsApp (2 matched no customer)" in text


async def test_demo_twilio_records_come_through_the_twilio_connector():
    demo = await import_demo()
    store = demo.store
    try:
        data = bundled()
        account = data["calls"][0]["account_sid"]
        phone = await store.records.find({"channel": {"$in": ["call", "sms", "whatsapp"]}}).to_list(None)
        roots = [c for c in data["calls"] if c["parent_call_sid"] is None]
        assert {r["_id"] for r in phone} == {c["sid"] for c in roots} | {m["sid"] for m in data["messages"]}
        for r in phone:
            lists = "calls" if r["channel"] == "call" else "messages"
            assert r["sources"] == [{"kind": "twilio", "source": TWILIO_SOURCE, "account_sid": account, "list": lists}]

        # The child leg joined its parent's record, with the recording; the agent's phone is ours.
        leg = next(c for c in data["calls"] if c["parent_call_sid"])
        parent = await store.records.find_one({"_id": leg["parent_call_sid"]})
        assert parent["call"]["legs"] == [leg["sid"]]
        recording = next(r for r in data["recordings"] if r["call_sid"] == parent["_id"])
        assert [r["sid"] for r in parent["call"]["recordings"]] == [recording["sid"]]
        assert {p["address"]: p["internal"] for p in parent["participants"]}[leg["to"]] is True
        assert parent["customer_ids"] == ["cust-acme-logistics"]

        # One call and one text match nobody: they are kept, with no customer.
        strangers = await store.records.find({"sources.kind": "twilio", "customer_ids": []}).to_list(None)
        assert sorted(r["channel"] for r in strangers) == ["call", "sms"]

        # The connector's windows and checkpoints, as in `commsync run`: read from `since`, done to the newest item.
        state = await store.load_state(TWILIO_SOURCE)
        newest_call = max(parsedate_to_datetime(c["start_time"]) for c in data["calls"])
        assert state["calls"] == {"cursor": newest_call.isoformat()}
        queries = [dict(parse_qsl(urlsplit(u).query)) | {"path": urlsplit(u).path} for u in demo.replay_requests]
        calls = [q for q in queries if q["path"].endswith("/Calls.json")]
        assert calls[0]["StartTime>"] == "2025-01-01" and len(calls) > 1 and all("PageToken" in q for q in calls[1:])
        assert any(q["path"].endswith("/Recordings.json") for q in queries)
        assert any(q["path"].endswith("/Messages.json") and q.get("DateSent>") == "2025-01-01" for q in queries)
    finally:
        store.close()


@pytest.mark.parametrize(
    "env",
    [
        {},
        # A proxy from the environment must not see the replay's requests (nor their Basic auth).
        {"HTTP_PROXY": "http://192.0.2.1:3128", "http_proxy": "http://192.0.2.1:3128", "NO_PROXY": "", "no_proxy": ""},
        # The service's overrides point at real servers; the demo ignores them.
        {
            "COMMSYNC_MONGODB__URI": "mongodb://192.0.2.1:27017",
            "COMMSYNC_TWILIO_ACCOUNTS": json.dumps([{"name": "prod", "account_sid": "AC" + "1" * 32, "auth_token": "x"}]),
        },
    ],
    ids=["plain", "http-proxy", "commsync-env"],
)
async def test_demo_needs_no_network_beyond_loopback(monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    connected = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(sock, address):
        connected.append(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"the demo tried to reach {address}")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"the demo tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    out = io.StringIO()
    assert await run_demo(out) == 0, out.getvalue()
    assert "FAILED" not in out.getvalue()
    inet = [a for a in connected if isinstance(a, tuple)]
    assert inet and all(a[0] == "127.0.0.1" for a in inet)


def test_bundled_pages_have_twilio_shapes():
    fields = {"calls": CALL_FIELDS, "messages": MESSAGE_FIELDS, "recordings": RECORDING_FIELDS}
    dates = {
        "calls": ("date_created", "date_updated", "start_time", "end_time"),
        "messages": ("date_created", "date_updated", "date_sent"),
        "recordings": ("date_created", "date_updated", "start_time"),
    }
    for path in twilio_pages():
        page = json.loads(path.read_text(encoding="utf-8"))
        key = path.stem
        assert set(page) == ENVELOPE | {key}
        assert page["next_page_uri"] is None and page["end"] == len(page[key]) - 1
        for item in page[key]:
            assert list(item) == fields[key], item["sid"]
            for name in dates[key]:
                # Twilio's RFC 2822 form, exactly as it writes it.
                assert format_datetime(parsedate_to_datetime(item[name])) == item[name]
    data = bundled()
    enums = [
        ("calls", "status", CALL_STATUSES),
        ("calls", "direction", CALL_DIRECTIONS),
        ("messages", "status", MESSAGE_STATUSES),
        ("messages", "direction", MESSAGE_DIRECTIONS),
        ("recordings", "status", RECORDING_STATUSES),
        ("recordings", "source", RECORDING_SOURCES),
    ]
    for key, name, allowed in enums:
        assert {item[name] for item in data[key]} <= allowed, (key, name)


# -- the replay server ------------------------------------------------------------------------


# No proxy from the environment between the tests and 127.0.0.1.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str) -> tuple[int, dict]:
    try:
        with OPENER.open(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def replay():
    data = Replay.from_pages(twilio_pages())
    with ReplayServer(data) as server:
        yield server


def listing(server: ReplayServer, resource: str, query: str = "") -> list[dict]:
    """Every item of a list, following next_page_uri from the first page."""
    key = resource.removesuffix(".json").lower()
    url = f"{server.base_url}/2010-04-01/Accounts/{server.replay.account_sid}/{resource}" + (f"?{query}" if query else "")
    items = []
    while url:
        status, body = get(url)
        assert status == 200, body
        assert set(body) == ENVELOPE | {key}
        items += body[key]
        url = server.base_url + body["next_page_uri"] if body["next_page_uri"] else None
    return items


def starts(items: list[dict], field: str) -> list:
    return [parsedate_to_datetime(i[field]) for i in items]


def test_replay_pages_newest_first_through_next_page_uri(replay):
    everything = listing(replay, "Calls.json")
    assert len(everything) == len(bundled()["calls"])
    times = starts(everything, "start_time")
    assert times == sorted(times, reverse=True)
    paged = listing(replay, "Calls.json", "PageSize=3")
    assert [c["sid"] for c in paged] == [c["sid"] for c in everything]
    before = len(replay.requests)
    listing(replay, "Calls.json", "PageSize=3")
    assert len(replay.requests) - before == -(-len(everything) // 3)


def test_replay_applies_twilio_filters(replay):
    calls, messages, recordings = (bundled()[k] for k in ("calls", "messages", "recordings"))
    # Calls: StartTime>= a day from its midnight on; StartTime<= a day means before that day.
    after = listing(replay, "Calls.json", "StartTime%3E=2025-04-16")
    day = datetime(2025, 4, 16, tzinfo=UTC)
    assert {c["sid"] for c in after} == {c["sid"] for c in calls if parsedate_to_datetime(c["start_time"]) >= day}
    before = listing(replay, "Calls.json", "StartTime%3C=2025-04-16")
    assert {c["sid"] for c in before} == {c["sid"] for c in calls} - {c["sid"] for c in after}
    on = listing(replay, "Calls.json", "StartTime=2025-04-16")
    assert len(on) == 2 and all(c["start_time"].startswith("Wed, 16 Apr 2025") for c in on)
    # Messages: DateSent<= a day includes that day.
    through = listing(replay, "Messages.json", "DateSent%3C=2025-02-05")
    assert [m["date_sent"][:16] for m in through] == ["Wed, 05 Feb 2025"] * 2
    # A child leg by its parent; recordings by call.
    leg = next(c for c in calls if c["parent_call_sid"])
    assert listing(replay, "Calls.json", f"ParentCallSid={leg['parent_call_sid']}") == [leg]
    rec = recordings[0]
    assert listing(replay, "Recordings.json", f"CallSid={rec['call_sid']}") == [rec]
    # Recordings: DateCreated<= a day means at or before its midnight.
    midnight = datetime(2025, 8, 4, tzinfo=UTC)
    assert listing(replay, "Recordings.json", "DateCreated%3C=2025-08-04") == [
        r for r in recordings if parsedate_to_datetime(r["date_created"]) <= midnight
    ]
    stranger = "+13125550143"
    assert [m["from"] for m in listing(replay, "Messages.json", f"From={stranger.replace('+', '%2B')}")] == [stranger]
    assert len(listing(replay, "Messages.json")) == len(messages)


def test_replay_fetches_one_call_and_refuses_the_rest(replay):
    account = replay.replay.account_sid
    call = bundled()["calls"][0]
    assert get(f"{replay.base_url}/2010-04-01/Accounts/{account}/Calls/{call['sid']}.json") == (200, call)
    status, body = get(f"{replay.base_url}/2010-04-01/Accounts/AC{'0' * 32}/Calls.json")
    assert status == 404 and body["code"] == 20404
    status, body = get(f"{replay.base_url}/2010-04-01/Accounts/{account}/Calls.json?StartTime%3E=yesterday")
    assert status == 400 and body["status"] == 400
    request = urllib.request.Request(f"{replay.base_url}/2010-04-01/Accounts/{account}/Calls.json", data=b"To=%2B1", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        OPENER.open(request, timeout=10)
    assert refused.value.code == 405
