"""The failure schedule: decided by the error's class, jittered, capped; refusals park a source."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from commsync.connectors.base import CredentialsRefused, MalformedItem, TemporarilyUnavailable
from commsync.connectors.oauth import TokenRefused, TokenUnavailable
from commsync.connectors.twilio import TwilioUnavailable
from commsync.connectors.twilio_records import Malformed
from commsync.daemon import retry

POLICY = retry.RetryPolicy(backoff_max=timedelta(seconds=60), auth_backoff_max=timedelta(hours=4), park_after=timedelta(days=3))


def test_errors_are_classified_by_class():
    assert retry.classify(CredentialsRefused("no")) == retry.REFUSED
    assert retry.classify(TokenRefused("invalid_grant")) == retry.REFUSED
    assert retry.classify(TemporarilyUnavailable("down")) == retry.UNAVAILABLE
    assert retry.classify(TokenUnavailable("token endpoint down")) == retry.UNAVAILABLE
    assert retry.classify(TwilioUnavailable("HTTP 503")) == retry.UNAVAILABLE
    assert retry.classify(ConnectionError("reset")) == retry.ERROR
    assert retry.classify(RuntimeError("bug")) == retry.ERROR
    # Twilio's item error is one malformed item, and still a ValueError for code that expects one.
    assert isinstance(Malformed("bad"), MalformedItem) and isinstance(Malformed("bad"), ValueError)


def test_outage_backoff_grows_with_jitter_and_is_capped():
    waits = [POLICY.delay(retry.UNAVAILABLE, n) for n in range(1, 12)]
    assert 1 <= waits[0] <= 2 and 8 <= waits[3] <= 16
    assert all(30 <= w <= 60 for w in waits[6:])
    assert len({round(POLICY.delay(retry.ERROR, 5), 6) for _ in range(20)}) > 1


def test_a_retry_after_from_the_remote_system_wins():
    assert POLICY.delay(retry.UNAVAILABLE, 1, retry_after=7.5) == 7.5
    assert POLICY.delay(retry.UNAVAILABLE, 1, retry_after=86400 * 2) == 4 * 3600  # never beyond the longest wait


def test_refused_credentials_wait_about_a_minute_first_then_hours():
    rng = random.Random(7)
    first = [POLICY.delay(retry.REFUSED, 1, rng=rng) for _ in range(200)]
    assert all(60 <= w <= 120 for w in first)
    late = [POLICY.delay(retry.REFUSED, n, rng=rng) for n in range(10, 20)]
    assert all(2 * 3600 <= w <= 4 * 3600 for w in late)


def test_a_wrong_password_makes_at_most_five_logins_in_its_first_150_seconds():
    for seed in range(200):
        rng = random.Random(seed)
        t, attempts, refusals = 0.0, [], 0
        while t <= 150:
            attempts.append(t)
            refusals += 1
            t += POLICY.delay(retry.REFUSED, refusals, rng=rng)
        assert len(attempts) <= 5, attempts


def test_parking_after_a_long_run_of_refusals():
    now = datetime(2026, 3, 10, tzinfo=UTC)
    assert not POLICY.parks(None, now)
    assert not POLICY.parks(now - timedelta(days=2, hours=23), now)
    assert POLICY.parks(now - timedelta(days=3), now)
    assert not retry.RetryPolicy(park_after=None).parks(now - timedelta(days=300), now)


def test_mongodb_unreachable_is_an_outage_not_a_bug():
    import pymongo.errors

    assert retry.classify(pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:27017: connection refused")) == retry.UNAVAILABLE
    assert retry.classify(pymongo.errors.AutoReconnect("connection reset")) == retry.UNAVAILABLE
    assert retry.classify(pymongo.errors.OperationFailure("not authorized")) == retry.ERROR
