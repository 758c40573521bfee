"""Twilio normalization and the pass window as pure functions: plain JSON (the spec's own examples) in, records out."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from commsync.connectors.twilio_records import (
    Malformed,
    Options,
    call_record,
    call_summary,
    duration_text,
    message_channel,
    message_record,
    parse_call,
    parse_time,
    recording_entry,
)
from commsync.connectors.twilio_window import MAX_CALL, LegGroups, Window

OPTS = Options(source="support", account_sid="AC" + "a" * 32, region="US", own_numbers=frozenset({"+18182008899"}))

# From twilio_api_v2010.json, paths ./Calls.json and ./Messages.json, example readFullPage1 (trimmed).
SPEC_CALL = {
    "account_sid": "ACaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "answered_by": "machine_start",
    "caller_name": "callerid1",
    "direction": "outbound-api",
    "duration": "4",
    "end_time": "Fri, 18 Oct 2019 17:03:00 +0000",
    "from": "+13051416799",
    "parent_call_sid": None,
    "price": "-0.200",
    "price_unit": "USD",
    "sid": "CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "start_time": "Fri, 18 Oct 2019 17:02:00 +0000",
    "status": "completed",
    "to": "+13051913581",
}
SPEC_MESSAGE = {
    "body": "testing",
    "date_sent": "Fri, 24 May 2019 17:44:50 +0000",
    "direction": "outbound-api",
    "from": "+12019235161",
    "num_media": "0",
    "num_segments": "1",
    "price": "-0.00750",
    "price_unit": "USD",
    "sid": "SMded05904ccb347238880ca9264e8fe1c",
    "status": "sent",
    "to": "+18182008801",
}


def test_spec_example_call_becomes_a_record():
    record = call_record(parse_call(SPEC_CALL), [], [], OPTS)
    assert record == {
        "_id": "CAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "channel": "call",
        "direction": "outbound",
        "occurred_at": datetime(2019, 10, 18, 17, 2, tzinfo=UTC),
        "participants": [
            {"role": "from", "address": "+13051416799", "name": None, "internal": True},
            {"role": "to", "address": "+13051913581", "name": None, "internal": False},
        ],
        "subject": None,
        "content": "Outbound call, 4 s, completed",
        "content_truncated": False,
        "thread_id": "+13051913581",
        "attachments": [],
        "sources": [{"kind": "twilio", "source": "support", "account_sid": OPTS.account_sid, "list": "calls"}],
        "call": {"status": "completed", "duration_s": 4, "price": "-0.200", "price_unit": "USD", "recordings": [], "legs": []},
    }


def test_spec_example_message_becomes_a_record():
    record = message_record(SPEC_MESSAGE, OPTS)
    assert record["_id"] == SPEC_MESSAGE["sid"]
    assert (record["channel"], record["direction"], record["content"]) == ("sms", "outbound", "testing")
    assert record["occurred_at"] == datetime(2019, 5, 24, 17, 44, 50, tzinfo=UTC)
    assert record["message"] == {"status": "sent", "num_media": 0, "num_segments": 1, "price": "-0.00750", "price_unit": "USD"}
    assert record["sources"][0]["list"] == "messages"
    assert message_record({**SPEC_MESSAGE, "date_sent": None, "status": "queued"}, OPTS) is None


def test_long_bodies_are_cut_and_flagged():
    opts = Options(source="s", account_sid="AC" + "a" * 32, max_content_chars=5)
    record = message_record({**SPEC_MESSAGE, "body": "ünïcødé ✓"}, opts)
    assert (record["content"], record["content_truncated"]) == ("ünïcø", True)


def test_own_numbers_are_internal_on_either_side():
    record = message_record({**SPEC_MESSAGE, "direction": "inbound", "from": "+18182008899", "to": "+12019235161"}, OPTS)
    assert [p["internal"] for p in record["participants"]] == [True, True]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ("garbage", "not an object"),
        ({**SPEC_CALL, "sid": None}, "no valid call sid"),
        ({**SPEC_CALL, "sid": "SMaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}, "no valid call sid"),
        ({**SPEC_CALL, "status": "done"}, "unknown call status 'done'"),
        ({**SPEC_CALL, "direction": "sideways"}, "unknown call direction 'sideways'"),
        ({**SPEC_CALL, "start_time": "not-a-date"}, "unparseable start_time 'not-a-date'"),
        ({**SPEC_CALL, "start_time": 12}, "start_time is a int"),
        ({**SPEC_CALL, "parent_call_sid": "nope"}, "invalid parent_call_sid"),
    ],
)
def test_malformed_calls_say_why(item, reason):
    with pytest.raises(Malformed, match="^" + reason.replace("(", r"\(") + "$"):
        parse_call(item)


def test_malformed_messages_say_why():
    for item, reason in [
        ([], "not an object"),
        ({**SPEC_MESSAGE, "sid": "CA" + "a" * 32}, "no valid message sid"),
        ({**SPEC_MESSAGE, "direction": None}, "unknown message direction 'None'"),
        ({**SPEC_MESSAGE, "date_sent": "yesterday"}, "unparseable date_sent 'yesterday'"),
    ]:
        with pytest.raises(Malformed, match=reason):
            message_record(item, OPTS)


def test_a_call_without_start_time_cannot_be_a_record():
    call = parse_call({**SPEC_CALL, "start_time": None, "status": "canceled"})
    assert call.start is None and call.final
    with pytest.raises(Malformed):
        call_record(call, [], [], OPTS)


def test_parent_with_legs_and_recordings():
    parent = parse_call({**SPEC_CALL, "direction": "inbound", "from": "+13051416799", "to": "+18182008899", "duration": "312"})
    leg = parse_call({**SPEC_CALL, "sid": "CA" + "b" * 32, "parent_call_sid": parent.sid, "direction": "outbound-dial",
                      "from": "+13051416799", "to": "client:alice", "start_time": "Fri, 18 Oct 2019 17:02:05 +0000"})
    recs = [
        {"sid": "RE2", "duration": "-1", "status": "in-progress", "date_created": "2", "uri": "/2010-04-01/Accounts/AC/Recordings/RE2.json"},
        {"sid": "RE1", "duration": "300", "status": "completed", "date_created": "1",
         "media_url": "https://api.twilio.com/2010-04-01/Accounts/AC/Recordings/RE1"},
        {"sid": "RE1", "duration": "300", "status": "completed", "date_created": "1"},
        {"sid": "RE3", "duration": "0", "status": "absent", "date_created": "3"},
    ]
    record = call_record(parent, [leg], recs, OPTS)
    assert record["direction"] == "inbound"
    assert record["call"]["legs"] == [leg.sid]
    assert record["call"]["recordings"] == [
        {"sid": "RE1", "duration_s": 300, "media_path": "/2010-04-01/Accounts/AC/Recordings/RE1"},
        {"sid": "RE2", "duration_s": None, "media_path": "/2010-04-01/Accounts/AC/Recordings/RE2"},
    ]
    assert record["participants"][-1] == {"role": "to", "address": "client:alice", "name": None, "internal": True}
    assert record["content"] == "Inbound call, 5 min 12 s, completed, 2 recordings"


def test_summaries_read_like_a_person_wrote_them():
    assert duration_text(252) == "4 min 12 s"
    assert duration_text(0) == "0 s" and duration_text(3600) == "1 h" and duration_text(3725) == "1 h 2 min 5 s"
    assert call_summary("outbound", "completed", 252, 0) == "Outbound call, 4 min 12 s, completed"
    assert call_summary("inbound", "no-answer", 0, 0) == "Inbound call, no answer"
    assert call_summary("inbound", "completed", 61, 3) == "Inbound call, 1 min 1 s, completed, 3 recordings"


def test_channels_and_times():
    assert message_channel({"from": "whatsapp:+1", "to": "whatsapp:+2"}) == "whatsapp"
    assert message_channel({"from": "+1", "to": "WhatsApp:+2"}) == "whatsapp"
    assert message_channel({"from": "+1", "to": "+2"}) == "sms"
    assert parse_time("Tue, 31 Aug 2010 20:36:28 +0200", "x") == datetime(2010, 8, 31, 18, 36, 28, tzinfo=UTC)
    assert parse_time(datetime(2020, 1, 1, 12, 0, 0, 123456), "x") == datetime(2020, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert parse_time(None, "x") is None and parse_time("", "x") is None
    assert recording_entry({"status": "completed"}) is None


# -- the window ------------------------------------------------------------------------------

T = datetime(2025, 3, 3, 0, 30, tzinfo=UTC)


def test_first_pass_reads_from_since_and_checkpoints_the_newest_item():
    w = Window.open(None, since=date(2025, 1, 1), lookback=timedelta(hours=2))
    assert (w.cursor, w.start) == (None, datetime(2025, 1, 1, tzinfo=UTC))
    assert w.day_filters() == ("2025-01-01", None)
    assert [w.place(t) for t in (T, T - timedelta(days=1))] == ["read", "read"]
    assert w.finished() == {"cursor": T.isoformat()}
    assert Window.open(None, since=None, lookback=timedelta(0)).day_filters() == (None, None)


def test_later_passes_read_back_lookback_from_the_cursor_by_whole_days():
    w = Window.open({"cursor": T.isoformat()}, since=date(2025, 1, 1), lookback=timedelta(hours=2))
    assert w.start == T - timedelta(hours=2)
    assert w.day_filters() == ("2025-03-02", None)  # 22:30 the day before: the whole of that day is asked for
    assert w.place(T - timedelta(hours=3)) == "older"
    # The cursor never moves back, even if the newest item read is older (deleted since).
    w.place(T - timedelta(minutes=5))
    assert w.finished() == {"cursor": T.isoformat()}
    # ... and never before `since`.
    assert Window.open({"cursor": "2025-01-01T01:00:00+00:00"}, since=date(2025, 1, 1), lookback=timedelta(hours=2)).start == datetime(
        2025, 1, 1, tzinfo=UTC
    )


def test_open_calls_hold_the_cursor_unless_they_are_older_than_any_call_can_last():
    w = Window.open(None, since=None, lookback=timedelta(hours=2))
    w.place(T)
    assert w.hold_at(T - timedelta(hours=1))
    assert not w.hold_at(T - MAX_CALL - timedelta(seconds=1))
    assert w.finished() == {"cursor": (T - timedelta(hours=1)).isoformat()}


def test_an_interrupted_pass_resumes_below_what_it_stored():
    w = Window.open({"cursor": None}, since=date(2025, 3, 1), lookback=timedelta(hours=2))
    for minutes in (50, 40, 30):
        w.place(T + timedelta(minutes=minutes))
    w.hold_at(T + timedelta(minutes=40))
    saved = w.progress(pending=T + timedelta(minutes=45))  # a leg waits for its parent: read it again
    assert saved == {
        "cursor": None,
        "pass": {
            "top": (T + timedelta(minutes=50)).isoformat(),
            "floor": (T + timedelta(minutes=30)).isoformat(),
            "below": (T + timedelta(minutes=45)).isoformat(),
            "hold": (T + timedelta(minutes=40)).isoformat(),
        },
    }
    again = Window.open(saved, since=date(2025, 3, 1), lookback=timedelta(hours=2))
    assert again.day_filters() == ("2025-03-01", "2025-03-04")
    # Recordings ask a call's length further: those of the calls below were made up to then.
    assert again.day_filters(reach=MAX_CALL) == ("2025-03-01", "2025-03-05")
    assert again.place(T + timedelta(minutes=45)) == "done"
    assert again.place(T + timedelta(minutes=31)) == "done"
    # Nothing read yet in the resumed pass: its checkpoint keeps the resume point.
    assert again.progress()["pass"]["floor"] == (T + timedelta(minutes=30)).isoformat()
    assert again.place(T + timedelta(minutes=30)) == "edge"  # a page may have ended inside this second
    assert again.place(T) == "read"
    assert again.finished() == {"cursor": (T + timedelta(minutes=40)).isoformat()}


def test_an_unreadable_checkpoint_starts_over_instead_of_failing():
    w = Window.open({"cursor": "garbage", "pass": {"below": 7}}, since=None, lookback=timedelta(hours=1))
    assert (w.cursor, w.start, w.below) == (None, None, None)


def test_legs_wait_for_their_parent_and_nest():
    def leg(sid, parent, minute):
        return parse_call({**SPEC_CALL, "sid": "CA" + sid * 32, "parent_call_sid": "CA" + parent * 32,
                           "start_time": f"Fri, 18 Oct 2019 17:{minute:02d}:00 +0000"})

    groups = LegGroups()
    groups.add(leg("c", "b", 9))  # a leg of a leg
    groups.add(leg("b", "a", 5))
    groups.add(leg("d", "a", 7))
    assert groups.newest() == datetime(2019, 10, 18, 17, 9, tzinfo=UTC)
    assert groups.sids() == {"CA" + x * 32 for x in "bcd"}
    assert [c.sid[2] for c in groups.take("CA" + "a" * 32)] == ["b", "c", "d"]
    assert groups.orphans() == {}
