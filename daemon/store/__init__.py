"""The MongoDB store: the one door to the database, and the only package that imports the driver.

`Store` is one object per database, assembled from parts with one job each:
the connection, collections, indexes, validators and checkpoints (base.py);
the capture path (records.py); customer histories, by deltas in transactions
or recomputed (histories.py); leases, instances and source status
(coordination.py); what the admin commands read and write (admin.py);
quarantine (quarantine.py); change streams on records for `commsync watch`
(events.py). ``memory://`` runs it on the mongomock double (memory.py).
Switching from motor to PyMongo's async client is a change in this package
alone.

Every batch costs a fixed number of round trips, whatever its size and its
customers' past (count them with `Store.commands`, a pymongo command
listener): four reads sent together (the records' previous customers,
tombstones, suppressed participants, one customer lookup), then the records
and their histories: one transaction of five commands, or, without
transactions, one bulk upsert and a recomputation of four.
"""

from __future__ import annotations

from typing import Any

import bson
import pymongo.errors

from .admin import AdminMixin
from .base import now_utc
from .coordination import CoordinationMixin
from .events import (
    Change,
    ChangesInterrupted,
    ChangeStreamsUnsupported,
    EventsMixin,
    RecordsInvalidated,
    ResumePointLost,
    token_from_json,
    token_json,
)
from .memory import patch_mongomock
from .quarantine import QuarantineMixin
from .records import BatchResult, RecordsMixin
from .refusals import StoreWriteRefused
from .verify import VerifyMixin

# The driver's errors that mean "the server cannot be reached now" (an outage, retried), for code outside the store.
UNREACHABLE: tuple[type[BaseException], ...] = (pymongo.errors.ConnectionFailure, pymongo.errors.ServerSelectionTimeoutError)


class Store(RecordsMixin, CoordinationMixin, AdminMixin, QuarantineMixin, VerifyMixin, EventsMixin):
    """Records, histories, checkpoints, coordination, quarantine, verification and change streams in one MongoDB database."""


def id_variants(text: Any) -> list[Any]:
    """The ids a command-line ``text`` may mean: itself, and the int or ObjectId it spells.

    CRMs key customers by strings, numbers or ObjectIds; a shell argument is always text.
    """
    out: list[Any] = [text]
    if isinstance(text, str):
        if text.isdigit() and len(text) < 19:
            out.append(int(text))
        if bson.ObjectId.is_valid(text) and len(text) == 24:
            out.append(bson.ObjectId(text))
    return out


__all__ = [
    "UNREACHABLE",
    "BatchResult",
    "Change",
    "ChangeStreamsUnsupported",
    "ChangesInterrupted",
    "RecordsInvalidated",
    "ResumePointLost",
    "Store",
    "StoreWriteRefused",
    "id_variants",
    "now_utc",
    "patch_mongomock",
    "token_from_json",
    "token_json",
]
