"""Single-item fetches (`verify --repair`'s refetch) fail, wait and recover as list pages do: real client, Twilio fake."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs
from test_twilio_connector import ACC, CUSTOMER, OURS, T0, TOKEN, account, minutes, settings_for

from commsync.connectors.base import CredentialsRefused, TemporarilyUnavailable
from commsync.daemon import app

from twilio_fake import FakeTwilio


@pytest.fixture
def fake():
    with FakeTwilio() as f:
        f.add_account(ACC, TOKEN, friendly_name="Support line")
        yield f


def connector(fake_twilio, **extra):
    (conn,) = app.build_connectors(settings_for(account(fake_twilio, channels=["messages"], **extra)), None)
    return conn


def add_message(fake_twilio, i=0):
    return fake_twilio.add_message(ACC, from_=CUSTOMER, to=OURS, body=f"m{i}", direction="inbound", date_sent=T0 + minutes(i))["sid"]


async def refetched(conn, sid):
    batches = [b async for b in conn.refetch("messages", None, [(sid, {})])]
    return [r["_id"] for b in batches for r in b.records]


async def test_a_429_on_a_fetch_waits_retry_after_and_fetches_again(fake):
    sid = add_message(fake)
    conn = connector(fake)
    waits = []

    async def sleep(seconds):  # the connector's pacing wait, recorded instead of slept
        waits.append(seconds)

    conn._sleep = sleep
    fake.fail_next(1, 429, retry_after=2, path=f"/Messages/{sid}.json")
    try:
        with capture_logs() as logs:
            assert await refetched(conn, sid) == [sid]
    finally:
        await conn.aclose()
    assert waits == [2.0]
    assert [e["wait_s"] for e in logs if e["event"] == "rate_limited"] == [2.0]
    assert [r.status for r in fake.requests_to(f"/Messages/{sid}.json")] == [429, 200]


async def test_a_503_on_a_fetch_hands_retry_after_to_the_runner(fake):
    sid = add_message(fake)
    conn = connector(fake)
    fake.fail_next(1, 503, retry_after=7, path=f"/Messages/{sid}.json")
    try:
        with pytest.raises(TemporarilyUnavailable) as caught:
            await refetched(conn, sid)
    finally:
        await conn.aclose()
    assert caught.value.retry_after == 7.0 and "HTTP 503" in str(caught.value)


async def test_a_401_on_a_fetch_reads_the_rotated_secret_for_the_next_attempt(fake, tmp_path):
    sid = add_message(fake)
    secret = tmp_path / "twilio.token"
    secret.write_text(TOKEN + "\n")
    conn = connector(fake, auth_token=None, auth_token_file=str(secret))
    try:
        assert await refetched(conn, sid) == [sid]  # the client is made with the first token
        # The token is rotated: Twilio refuses the old one, the file holds the new one.
        fake.accounts[ACC]["auth_token"] = "tok-rotated-2"
        secret.write_text("tok-rotated-2\n")
        with pytest.raises(CredentialsRefused, match="HTTP 401"):
            await refetched(conn, sid)
        assert await refetched(conn, sid) == [sid]
    finally:
        await conn.aclose()
    assert [r.status for r in fake.requests_to(f"/Messages/{sid}.json")] == [200, 401, 200]


async def test_a_missing_item_is_none_not_an_error(fake):
    conn = connector(fake)
    try:
        assert await refetched(conn, "SM" + "0" * 32) == []
    finally:
        await conn.aclose()
