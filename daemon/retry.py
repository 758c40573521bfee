"""How long a failing source waits before its next attempt, decided by the error's class. Pure.

Three kinds of failure, each with its own counter and backoff:

* refused credentials (`CredentialsRefused`: a tagged NO to LOGIN, HTTP 401,
  OAuth2 invalid_grant): retrying soon cannot help and gets accounts locked, so
  the wait starts around a minute and grows to hours; after ``park_after`` of
  nothing but refusals the source is parked until its config changes or an
  admin resumes it;
* outages (`TemporarilyUnavailable`: a connection refused or dropped, a 5xx, a
  token endpoint down): seconds, growing to ``backoff_max``; the remote
  system's own Retry-After wins when it gave one;
* anything else (a bug, an unexpected answer): the outage schedule.

Every wait is jittered (between half and all of the ceiling), so sources that
fail together do not retry in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from commsync.connectors.base import CredentialsRefused, TemporarilyUnavailable

REFUSED = "refused"
UNAVAILABLE = "unavailable"
ERROR = "error"


def classify(exc: BaseException) -> str:
    """What kind of failure ``exc`` is, by its class."""
    if isinstance(exc, CredentialsRefused):
        return REFUSED
    if isinstance(exc, TemporarilyUnavailable) or _store_unreachable(exc):
        return UNAVAILABLE
    return ERROR


def _store_unreachable(exc: BaseException) -> bool:
    """The store's own outage (MongoDB unreachable) is an outage too, not a bug to trace."""
    import sys

    store = sys.modules.get("commsync.daemon.store")  # not loaded: nothing in this process talks to MongoDB
    return store is not None and isinstance(exc, store.UNREACHABLE)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The schedule of one daemon (from ``daemon.*`` settings)."""

    backoff_max: timedelta = timedelta(minutes=10)
    auth_backoff_min: timedelta = timedelta(seconds=60)
    auth_backoff_max: timedelta = timedelta(hours=4)
    park_after: timedelta | None = timedelta(days=3)

    def delay(self, kind: str, attempt: int, retry_after: float | None = None, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th consecutive failure of this ``kind`` (1 = the first)."""
        rng = rng or random
        n = max(1, attempt)
        if kind == REFUSED:
            low = self.auth_backoff_min.total_seconds()
            ceiling = min(self.auth_backoff_max.total_seconds(), low * 2.0 ** min(n, 30))
            # Never sooner than the minimum: the first retry comes after about a minute, not at once.
            return rng.uniform(max(low, ceiling / 2), max(low, ceiling))
        if retry_after is not None and retry_after > 0:
            # The remote system said when: earlier is pointless, later wastes time.
            return min(retry_after, self.auth_backoff_max.total_seconds())
        ceiling = min(self.backoff_max.total_seconds(), 2.0 ** min(n, 30))
        return rng.uniform(ceiling / 2, ceiling)

    def parks(self, refused_since: datetime | None, now: datetime) -> bool:
        """True when a source refused since ``refused_since`` must stop trying."""
        return self.park_after is not None and refused_since is not None and now - refused_since >= self.park_after
