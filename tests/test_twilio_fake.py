"""The real `twilio` client (sync and async) against tests/twilio_fake.py,
plus shape checks of the fake against Twilio's OpenAPI spec."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta, timezone
from email.utils import parsedate_tz

import pytest
import requests
from twilio.base.exceptions import TwilioException, TwilioRestException

from seed import TWILIO_SPEC
from twilio_fake import (
    ACCOUNT_FIELDS,
    CALL_FIELDS,
    CALL_RECORDING_FIELDS,
    MESSAGE_FIELDS,
    RECORDING_FIELDS,
    FakeTwilio,
    async_client_for,
    client_for,
)

ACC = "AC" + "1" * 32
TOKEN = "secret-token"
UTC = UTC


def T(*a) -> datetime:
    return datetime(*a, tzinfo=UTC)


@pytest.fixture
def fake():
    with FakeTwilio() as f:
        f.add_account(ACC, TOKEN, friendly_name="Test account")
        yield f


@pytest.fixture
def client(fake):
    return client_for(fake, ACC, TOKEN)


def raw_get(fake, path, auth=(ACC, TOKEN), **params):
    return requests.get(fake.base_url + path, params=params, auth=auth, timeout=5)


# ---------------------------------------------------------------- account / auth

def test_fetch_account_and_api_key_auth(fake, client):
    acct = client.api.v2010.accounts(ACC).fetch()
    assert acct.sid == ACC
    assert acct.status == "active"
    assert acct.friendly_name == "Test account"
    assert acct.date_created.tzinfo is not None

    key, secret = fake.add_api_key(ACC)
    kclient = client_for(fake, key, secret, account_sid=ACC)
    assert kclient.api.v2010.account.fetch().sid == ACC
    assert fake.requests[-1].auth_user == key


def test_wrong_token_401(fake):
    bad = client_for(fake, ACC, "wrong")
    # fetch -> TwilioRestException with Twilio's code
    with pytest.raises(TwilioRestException) as ei:
        bad.api.v2010.account.fetch()
    assert ei.value.status == 401
    assert ei.value.code == 20003
    # list -> the client raises plain TwilioException("Unable to fetch page", response)
    with pytest.raises(TwilioException) as ei2:
        bad.calls.list()
    assert not isinstance(ei2.value, TwilioRestException)
    assert ei2.value.args[1].status_code == 401
    # exact body shape
    r = raw_get(fake, "/2010-04-01/Accounts/%s/Calls.json" % ACC, auth=(ACC, "wrong"))
    assert r.status_code == 401
    assert r.json() == {"code": 20003, "message": "Authenticate",
                        "more_info": "https://www.twilio.com/docs/errors/20003",
                        "status": 401}
    # credentials of another account cannot read this one
    other = "AC" + "2" * 32
    fake.add_account(other, "t2")
    r = raw_get(fake, "/2010-04-01/Accounts/%s/Calls.json" % ACC, auth=(other, "t2"))
    assert r.status_code == 401


def test_unknown_path_404(fake):
    r = raw_get(fake, "/2010-04-01/Accounts/%s/Nope.json" % ACC)
    assert r.status_code == 404
    body = r.json()
    assert set(body) == {"code", "message", "more_info", "status"}
    assert body["code"] == 20404 and body["status"] == 404
    r = raw_get(fake, "/2010-04-01/Accounts/%s/Calls/CA%s.json" % (ACC, "0" * 32))
    assert r.status_code == 404


# ---------------------------------------------------------------- calls

def _seed_calls(fake, n=11):
    sids = []
    for i in range(n):
        sids.append(fake.add_call(ACC, start_time=T(2024, 1, 1, 8) + timedelta(hours=7 * i),
                                  from_="+15551230000", to="+15559870000",
                                  duration=60 + i)["sid"])
    return sids  # oldest first


def test_calls_pagination_newest_first(fake, client):
    sids = _seed_calls(fake, 11)
    calls = client.calls.list(page_size=3)
    assert [c.sid for c in calls] == list(reversed(sids))
    starts = [c.start_time for c in calls]
    assert starts == sorted(starts, reverse=True)
    reqs = fake.requests_to("/Calls.json")
    assert len(reqs) == 4  # 3+3+3+2
    assert reqs[0].query == {"PageSize": "3"}
    assert [r.query.get("Page") for r in reqs] == [None, "1", "2", "3"]
    assert all(r.query["PageToken"].startswith("PACA") for r in reqs[1:])
    c = calls[0]
    assert c.duration == "70" and c.status == "completed" and c._from == "+15551230000"
    assert c.end_time - c.start_time == timedelta(seconds=70)


def test_list_envelope_shape(fake):
    _seed_calls(fake, 5)
    path = "/2010-04-01/Accounts/%s/Calls.json" % ACC
    p0 = raw_get(fake, path, PageSize=2, **{"From": "+15551230000"}).json()
    assert set(p0) == {"calls", "end", "first_page_uri", "next_page_uri", "page",
                       "page_size", "previous_page_uri", "start", "uri"}
    assert (p0["page"], p0["page_size"], p0["start"], p0["end"]) == (0, 2, 0, 1)
    assert p0["previous_page_uri"] is None
    assert p0["first_page_uri"] == path + "?From=%2B15551230000&PageSize=2&Page=0"
    assert p0["next_page_uri"].startswith(path + "?From=%2B15551230000&PageSize=2&Page=1&PageToken=PACA")
    r = requests.get(fake.base_url + p0["next_page_uri"], auth=(ACC, TOKEN)).json()
    assert (r["page"], r["start"], r["end"]) == (1, 2, 3)
    assert r["previous_page_uri"].startswith(path + "?From=%2B15551230000&PageSize=2&Page=0&PageToken=PBCA")
    back = requests.get(fake.base_url + r["previous_page_uri"], auth=(ACC, TOKEN)).json()
    assert [c["sid"] for c in back["calls"]] == [c["sid"] for c in p0["calls"]]
    last = requests.get(fake.base_url + r["next_page_uri"], auth=(ACC, TOKEN)).json()
    assert len(last["calls"]) == 1 and last["next_page_uri"] is None
    empty = raw_get(fake, path, To="+10000000000").json()
    assert empty["calls"] == [] and empty["end"] == 0 and empty["page_size"] == 50
    # PageSize is clamped to the spec maximum
    assert raw_get(fake, path, PageSize=5000).json()["page_size"] == 1000


def test_start_time_after_filter_day_semantics(fake, client):
    before = fake.add_call(ACC, start_time=T(2024, 1, 1, 23, 59, 59))["sid"]
    early = fake.add_call(ACC, start_time=T(2024, 1, 2, 0, 0, 30))["sid"]
    late = fake.add_call(ACC, start_time=T(2024, 1, 3, 15, 0))["sid"]
    queued = fake.add_call(ACC, status="queued")["sid"]  # no start_time -> never matches

    got = client.calls.list(start_time_after=date(2024, 1, 2))
    assert [c.sid for c in got] == [late, early]
    assert fake.requests[-1].query == {"StartTime>": "2024-01-02T00:00:00Z"}
    assert "StartTime%3E=2024-01-02T00%3A00%3A00Z" in fake.requests[-1].raw_query

    got = client.calls.list(start_time_after="2024-01-02")  # strings go verbatim
    assert fake.requests[-1].query == {"StartTime>": "2024-01-02"}
    assert [c.sid for c in got] == [late, early]

    got = client.calls.list(start_time_after=datetime(2024, 1, 2, 12, 0, tzinfo=UTC))
    assert fake.requests[-1].query == {"StartTime>": "2024-01-02T12:00:00Z"}
    assert [c.sid for c in got] == [late]

    got = client.calls.list(start_time_before="2024-01-02")  # "before this date"
    assert [c.sid for c in got] == [before]
    got = client.calls.list(start_time=date(2024, 1, 2))  # equality = that UTC day
    assert [c.sid for c in got] == [early]
    got = client.calls.list(status="queued")
    assert [c.sid for c in got] == [queued]

    r = raw_get(fake, "/2010-04-01/Accounts/%s/Calls.json" % ACC, **{"StartTime>": "yesterday"})
    assert r.status_code == 400 and r.json()["status"] == 400


def test_client_sends_aware_datetimes_without_converting_to_utc(fake, client):
    cest = timezone(timedelta(hours=2))
    client.calls.list(start_time_after=datetime(2024, 1, 2, 12, 0, tzinfo=cest))
    # 12:00+02:00 is 10:00Z, but twilio's serializer just strftime()s with a literal Z
    assert fake.requests[-1].query == {"StartTime>": "2024-01-02T12:00:00Z"}


def test_day_precision_mode_ignores_time_of_day():
    with FakeTwilio(datetime_filter_precision="day") as f:
        f.add_account(ACC, TOKEN)
        early = f.add_call(ACC, start_time=T(2024, 1, 2, 0, 0, 30))["sid"]
        c = client_for(f, ACC, TOKEN)
        got = c.calls.list(start_time_after=datetime(2024, 1, 2, 12, 0, tzinfo=UTC))
        assert [x.sid for x in got] == [early]


def test_call_filters_and_lifecycle(fake, client):
    parent = fake.add_call(ACC, start_time=T(2024, 2, 1, 10), direction="inbound",
                           status="in-progress")
    assert parent["end_time"] is None and parent["duration"] is None
    child = fake.add_call(ACC, start_time=T(2024, 2, 1, 10, 0, 5), direction="outbound-dial",
                          parent_call_sid=parent["sid"], to="client:alice",
                          status="in-progress")
    got = client.calls.list(parent_call_sid=parent["sid"])
    assert [c.sid for c in got] == [child["sid"]]
    assert got[0].to == "client:alice" and got[0].to_formatted == "client:alice"

    c = client.calls(parent["sid"]).fetch()
    assert c.status == "in-progress" and c.price is None and c.end_time is None
    fake.update_call(parent["sid"], status="completed", end_time=T(2024, 2, 1, 10, 5))
    c = client.calls(parent["sid"]).fetch()
    assert c.status == "completed" and c.duration == "300" and c.price is None
    fake.update_call(parent["sid"], price="-0.0130")
    c = client.calls(parent["sid"]).fetch()
    assert c.price == "-0.0130" and c.price_unit == "USD"
    assert c.date_updated >= c.date_created

    got = client.calls.list(end_time_after=date(2024, 2, 1), status="completed")
    assert [x.sid for x in got] == [parent["sid"]]
    assert fake.requests[-1].query == {"Status": "completed", "EndTime>": "2024-02-01T00:00:00Z"}

    with pytest.raises(ValueError):
        fake.add_call(ACC, status="done")
    with pytest.raises(TypeError):
        fake.add_call(ACC, start=T(2024, 1, 1))


# ---------------------------------------------------------------- messages

def test_messages_whatsapp_and_ordering(fake, client):
    wa_in = fake.add_message(ACC, from_="whatsapp:+15557654321", to="whatsapp:+14155238886",
                             body="hi there", direction="inbound",
                             date_sent=T(2024, 3, 1, 9))
    wa_out = fake.add_message(ACC, from_="whatsapp:+14155238886", to="whatsapp:+15557654321",
                              body="hello!", direction="outbound-reply",
                              date_sent=T(2024, 3, 1, 9, 1), num_media=1)
    sms = fake.add_message(ACC, from_="+15557654321", to="+14155238886", body="sms",
                           direction="inbound", date_sent=T(2024, 2, 28, 12))
    queued = fake.add_message(ACC, to="+15557654321", status="queued",
                              date_created=T(2024, 3, 1, 10))
    assert queued["date_sent"] is None

    msgs = client.messages.list(page_size=2)
    assert [m.sid for m in msgs] == [queued["sid"], wa_out["sid"], wa_in["sid"], sms["sid"]]
    assert msgs[1].from_ == "whatsapp:+14155238886" and msgs[1].num_media == "1"
    assert msgs[0].date_sent is None and msgs[0].status == "queued"

    got = client.messages.list(to="whatsapp:+15557654321")
    assert [m.sid for m in got] == [wa_out["sid"]]
    assert fake.requests[-1].query == {"To": "whatsapp:+15557654321"}
    assert "To=whatsapp%3A%2B15557654321" in fake.requests[-1].raw_query

    got = client.messages.list(date_sent_after=date(2024, 3, 1))
    assert [m.sid for m in got] == [wa_out["sid"], wa_in["sid"]]
    assert fake.requests[-1].query == {"DateSent>": "2024-03-01T00:00:00Z"}
    got = client.messages.list(date_sent_before="2024-02-29")  # "on and before" the day
    assert [m.sid for m in got] == [sms["sid"]]

    fake.update_message(queued["sid"], status="delivered", date_sent=T(2024, 3, 1, 10, 0, 2),
                        price="-0.0079")
    m = client.messages(queued["sid"]).fetch()
    assert m.status == "delivered" and m.price == "-0.0079"
    assert m.date_sent == T(2024, 3, 1, 10, 0, 2)


# ---------------------------------------------------------------- recordings

def test_recordings_of_a_call(fake, client):
    call = fake.add_call(ACC, start_time=T(2024, 4, 1, 10), duration=120)
    other = fake.add_call(ACC, start_time=T(2024, 4, 1, 11), duration=30)
    r1 = fake.add_recording(ACC, call["sid"], date_created=T(2024, 4, 1, 10, 0, 1), duration=119)
    r2 = fake.add_recording(ACC, call["sid"], date_created=T(2024, 4, 1, 10, 1))
    fake.add_recording(ACC, other["sid"], date_created=T(2024, 4, 1, 11, 0, 1))

    recs = client.calls(call["sid"]).recordings.list()
    assert [r.sid for r in recs] == [r2["sid"], r1["sid"]]
    assert recs[1].duration == "119" and recs[0].duration == "120"
    assert recs[0].call_sid == call["sid"] and recs[0].track == "both"

    recs = client.recordings.list(call_sid=call["sid"])
    assert [r.sid for r in recs] == [r2["sid"], r1["sid"]]
    assert recs[0].media_url.endswith("/Recordings/" + r2["sid"])
    assert fake.requests[-1].query == {"CallSid": call["sid"]}

    # call-scoped list serialises dates as YYYY-MM-DD
    client.calls(call["sid"]).recordings.list(date_created_after=date(2024, 4, 1))
    assert fake.requests[-1].query == {"DateCreated>": "2024-04-01"}
    assert len(client.recordings.list(date_created_after=date(2024, 4, 2))) == 0
    assert fake.requests[-1].query == {"DateCreated>": "2024-04-02T00:00:00Z"}
    assert client.recordings(r1["sid"]).fetch().call_sid == call["sid"]


# ---------------------------------------------------------------- faults

def test_429_retry_after_is_returned_not_retried(fake, client):
    _seed_calls(fake, 2)
    fake.fail_next(1, 429, retry_after=7)
    with pytest.raises(TwilioException) as ei:
        client.calls.list()
    resp = ei.value.args[1]
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert json.loads(resp.text)["code"] == 20429
    assert len(fake.requests) == 1  # the client did not retry
    assert len(client.calls.list()) == 2  # fault consumed

    fake.fail_next(1, 429, retry_after=3, path="/Accounts/%s.json" % ACC)
    with pytest.raises(TwilioRestException) as ei2:
        client.api.v2010.account.fetch()
    assert ei2.value.status == 429 and ei2.value.code == 20429


def test_5xx_faults_with_path_filter(fake, client):
    _seed_calls(fake, 4)
    fake.fail_next(2, 503, path="/Messages.json")
    assert len(client.calls.list()) == 4  # not matching the path
    for _ in range(2):
        with pytest.raises(TwilioException) as ei:
            client.messages.list()
        assert ei.value.args[1].status_code == 503
    assert client.messages.list() == []
    # fault on the 2nd page only: first page is fine, pagination breaks mid-way
    fake.clear_requests()
    fake.fail_next(1, 500, path="/Calls.json", skip=1)
    with pytest.raises(TwilioException) as ei:
        client.calls.list(page_size=2)
    assert ei.value.args[1].status_code == 500
    assert [r.status for r in fake.requests] == [200, 500]
    assert fake.requests[1].query["Page"] == "1"
    fake.fail_next(1, 502, body="<html>bad gateway</html>")
    with pytest.raises(TwilioException) as ei:
        client.calls.list()
    assert ei.value.args[1].text == "<html>bad gateway</html>"


def test_disconnect_and_server_down(fake, client):
    fake.disconnect_next(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.calls.list()
    assert client.calls.list() == []


def test_malformed_item_injection(fake, client):
    sids = list(reversed(_seed_calls(fake, 3)))
    fake.malformed_next("/Calls.json", kind="missing_sid", index=1)
    got = client.calls.list()
    assert [c.sid for c in got] == [sids[0], None, sids[2]]
    assert got[1].start_time is not None

    fake.malformed_next("/Calls.json", kind="bad_date", index=0)
    r = raw_get(fake, "/2010-04-01/Accounts/%s/Calls.json" % ACC).json()
    assert r["calls"][0]["start_time"] == "not-a-date"
    assert parsedate_tz(r["calls"][1]["start_time"]) is not None
    fake.malformed_next("/Calls.json", kind="bad_date", index=0)
    got = client.calls.list()
    assert got[0].sid == sids[0] and got[0].start_time is None  # client swallows it
    assert got[1].start_time is not None
    assert client.calls.list()[0].start_time is not None  # one-shot


# ---------------------------------------------------------------- async client

async def test_async_client_list_and_errors(fake):
    sids = list(reversed(_seed_calls(fake, 7)))
    wa = fake.add_message(ACC, from_="whatsapp:+15557654321", to="whatsapp:+14155238886",
                          direction="inbound", date_sent=T(2024, 3, 1, 9))
    client = async_client_for(fake, ACC, TOKEN)
    try:
        calls = await client.calls.list_async(page_size=2, from_="+15551230000")
        assert [c.sid for c in calls] == sids
        reqs = fake.requests_to("/Calls.json")
        assert len(reqs) == 4 and reqs[0].query == {"From": "+15551230000", "PageSize": "2"}
        assert reqs[-1].query["From"] == "+15551230000"  # '+' survives aiohttp and paging

        got = await client.calls.list_async(start_time_after=date(2024, 1, 2))
        assert fake.requests[-1].query == {"StartTime>": "2024-01-02T00:00:00Z"}
        assert [c.sid for c in got] == sids[:4]  # Jan 2 05:00, 12:00, 19:00, Jan 3 02:00

        msgs = await client.messages.list_async(from_="whatsapp:+15557654321")
        assert [m.sid for m in msgs] == [wa["sid"]]

        acct = await client.api.v2010.account.fetch_async()
        assert acct.sid == ACC

        fake.fail_next(1, 429, retry_after=5)
        n = len(fake.requests)
        with pytest.raises(TwilioException) as ei:
            await client.calls.list_async()
        assert ei.value.args[1].status_code == 429
        assert ei.value.args[1].headers["Retry-After"] == "5"
        assert len(fake.requests) == n + 1
    finally:
        await client.http_client.close()

    bad = async_client_for(fake, ACC, "nope")
    try:
        with pytest.raises(TwilioRestException) as ei:
            await bad.api.v2010.account.fetch_async()
        assert ei.value.status == 401
    finally:
        await bad.http_client.close()


def test_alternative_domain_base_url(fake):
    from twilio.rest import Client
    fake.add_call(ACC, start_time=T(2024, 1, 1))
    fake.add_call(ACC, start_time=T(2024, 1, 2))
    c = Client(ACC, TOKEN, environment={"X": "1"})
    c.api.base_url = fake.base_url
    c.http_client.session.trust_env = False
    assert len(c.calls.list(page_size=1)) == 2
    assert len(fake.requests_to("/Calls.json")) == 2


# ---------------------------------------------------------------- spec drift

@pytest.fixture(scope="module")
def spec():
    if not TWILIO_SPEC.exists():
        pytest.skip("Twilio OpenAPI spec not available at %s" % TWILIO_SPEC)
    return json.loads(TWILIO_SPEC.read_text())


def _props(spec, name):
    return list(spec["components"]["schemas"][name]["properties"])


def _list_props(spec, path):
    op = spec["paths"][path]["get"]
    return set(op["responses"]["200"]["content"]["application/json"]["schema"]["properties"])


def test_shapes_match_spec(spec, fake, client):
    assert _props(spec, "api.v2010.account.call") == CALL_FIELDS
    assert _props(spec, "api.v2010.account.message") == MESSAGE_FIELDS
    assert _props(spec, "api.v2010.account.recording") == RECORDING_FIELDS
    assert _props(spec, "api.v2010.account.call.call_recording") == CALL_RECORDING_FIELDS
    assert _props(spec, "api.v2010.account") == ACCOUNT_FIELDS

    call = fake.add_call(ACC, start_time=T(2024, 5, 1, 12))
    msg = fake.add_message(ACC, body="x")
    rec = fake.add_recording(ACC, call["sid"])
    base = "/2010-04-01/Accounts/%s" % ACC
    checks = [
        (base + "/Calls.json", "calls", "api.v2010.account.call",
         "/2010-04-01/Accounts/{AccountSid}/Calls.json"),
        (base + "/Messages.json", "messages", "api.v2010.account.message",
         "/2010-04-01/Accounts/{AccountSid}/Messages.json"),
        (base + "/Recordings.json", "recordings", "api.v2010.account.recording",
         "/2010-04-01/Accounts/{AccountSid}/Recordings.json"),
        (base + "/Calls/%s/Recordings.json" % call["sid"], "recordings",
         "api.v2010.account.call.call_recording",
         "/2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}/Recordings.json"),
    ]
    schemas = spec["components"]["schemas"]
    rfc = re.compile(r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} \+0000$")
    for url, key, schema, spec_path in checks:
        page = raw_get(fake, url).json()
        assert set(page) == _list_props(spec, spec_path), url
        item = page[key][0]
        assert set(item) == set(schemas[schema]["properties"]), url
        for name, prop in schemas[schema]["properties"].items():
            v = item[name]
            if v is None:
                continue
            if prop.get("format") == "date-time-rfc-2822":
                assert rfc.match(v), (name, v)
            if "pattern" in prop:
                assert re.match(prop["pattern"], v), (name, v)
            if "$ref" in prop:
                enum = schemas[prop["$ref"].split("/")[-1]].get("enum")
                if enum:
                    assert v in enum, (name, v)
            if prop.get("type") == "string" and name != "price":
                assert isinstance(v, str), (name, v)
            if prop.get("type") == "integer":
                assert isinstance(v, int), (name, v)
    acct = raw_get(fake, base + ".json").json()
    assert set(acct) == set(schemas["api.v2010.account"]["properties"])
    assert rfc.match(acct["date_created"])
    # the list query names the fake honours are exactly the spec's
    for spec_path, names in [
        ("/2010-04-01/Accounts/{AccountSid}/Calls.json",
         {"To", "From", "ParentCallSid", "Status", "StartTime", "StartTime<", "StartTime>",
          "EndTime", "EndTime<", "EndTime>", "PageSize", "Page", "PageToken"}),
        ("/2010-04-01/Accounts/{AccountSid}/Messages.json",
         {"To", "From", "DateSent", "DateSent<", "DateSent>", "PageSize", "Page", "PageToken"}),
    ]:
        q = {p["name"] for p in spec["paths"][spec_path]["get"]["parameters"] if p["in"] == "query"}
        assert q == names
    assert msg["sid"].startswith("SM") and rec["sid"].startswith("RE")
