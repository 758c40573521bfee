"""The storage contract as MongoDB $jsonSchema validators, and the schema version documents carry.

Installed on `records` and `customer_history` at start and by `commsync
init-db` (validation level "moderate": documents that were already invalid
may still be updated, every new or valid one is checked). The validators
check what integrators rely on (the fields, their types, the enumerations)
and allow extra fields, so a later version can add fields without breaking
readers; `schema_version` says which contract a document follows.
"""

from __future__ import annotations

from typing import Any

from commsync.connectors import registry

SCHEMA_VERSION = 1

_INT = ["int", "long"]
_STR_OR_NULL = ["string", "null"]
_DATE_OR_NULL = ["date", "null"]

DIRECTIONS = ["inbound", "outbound"]

_PARTICIPANT = {
    "bsonType": "object",
    "required": ["role", "address", "internal"],
    "properties": {
        "role": {"bsonType": "string"},
        "address": {"bsonType": "string"},
        "name": {"bsonType": _STR_OR_NULL},
        "internal": {"bsonType": "bool"},
    },
}

_SOURCE = {
    "bsonType": "object",
    "required": ["kind", "source"],
    "properties": {"kind": {"bsonType": "string"}, "source": {"bsonType": "string"}, "gone_at": {"bsonType": "date"}},
}

_ATTACHMENT = {
    "bsonType": "object",
    "properties": {
        "filename": {"bsonType": _STR_OR_NULL},
        "content_type": {"bsonType": _STR_OR_NULL},
        "size": {"bsonType": [*_INT, "null"]},
    },
}

def record_schema() -> dict[str, Any]:
    """The contract of a record, with the channels of every registered source kind."""
    return _RECORD_SCHEMA | {"properties": {**_RECORD_SCHEMA["properties"], "channel": {"enum": registry.channels()}}}


def history_schema() -> dict[str, Any]:
    """The contract of a customer history document."""
    return _HISTORY_SCHEMA | {"properties": {**_HISTORY_SCHEMA["properties"], "last_channel": {"enum": registry.channels()}}}


_RECORD_SCHEMA: dict[str, Any] = {
    "bsonType": "object",
    "title": "commsync record",
    "required": [
        "_id",
        "channel",
        "direction",
        "occurred_at",
        "participants",
        "customer_ids",
        "sources",
        "ingested_at",
        "schema_version",
    ],
    "properties": {
        "_id": {"bsonType": "string"},
        "schema_version": {"bsonType": _INT, "minimum": 1},
        "direction": {"enum": DIRECTIONS},
        "occurred_at": {"bsonType": "date"},
        "customer_ids": {"bsonType": "array"},
        "participants": {"bsonType": "array", "items": _PARTICIPANT},
        "subject": {"bsonType": _STR_OR_NULL},
        "content": {"bsonType": _STR_OR_NULL},
        "content_truncated": {"bsonType": "bool"},
        "subject_truncated": {"bsonType": "bool"},
        "participants_truncated": {"bsonType": "bool"},
        "references_truncated": {"bsonType": "bool"},
        "attachments_truncated": {"bsonType": "bool"},
        "message_id": {"bsonType": _STR_OR_NULL},
        "in_reply_to": {"bsonType": _STR_OR_NULL},
        "references": {"bsonType": "array", "items": {"bsonType": "string"}},
        "thread_id": {"bsonType": _STR_OR_NULL},
        "attachments": {"bsonType": "array", "items": _ATTACHMENT},
        "size": {"bsonType": _INT},
        "parse_defects": {"bsonType": "array", "items": {"bsonType": "string"}},
        "automated": {"bsonType": "bool"},
        "automated_by": {"bsonType": "array", "items": {"bsonType": "string"}},
        # Entries of items no longer where they were seen carry gone_at; none is ever removed.
        "sources": {"bsonType": "array", "items": _SOURCE},
        "ingested_at": {"bsonType": "date"},
        "call": {"bsonType": "object"},
        "message": {"bsonType": "object"},
    },
}

_CHANNEL_SUMMARY = {
    "bsonType": "object",
    "required": ["count", "first_at", "last_at"],
    "properties": {
        "count": {"bsonType": _INT, "minimum": 1},
        "first_at": {"bsonType": _DATE_OR_NULL},
        "last_at": {"bsonType": _DATE_OR_NULL},
        "talk_seconds": {"bsonType": _INT},
    },
}

_HISTORY_SCHEMA: dict[str, Any] = {
    "bsonType": "object",
    "title": "commsync customer history",
    "required": [
        "_id",
        "total",
        "first_at",
        "last_at",
        "last_channel",
        "last_direction",
        "inbound",
        "outbound",
        "channels",
        "updated_at",
        "schema_version",
    ],
    "properties": {
        "schema_version": {"bsonType": _INT, "minimum": 1},
        "total": {"bsonType": _INT, "minimum": 1},
        "first_at": {"bsonType": "date"},
        "last_at": {"bsonType": "date"},
        "last_direction": {"enum": DIRECTIONS},
        "inbound": {"bsonType": _INT, "minimum": 0},
        "outbound": {"bsonType": _INT, "minimum": 0},
        "channels": {"bsonType": "object", "additionalProperties": _CHANNEL_SUMMARY},
        "updated_at": {"bsonType": "date"},
    },
}


def validator(schema: dict[str, Any]) -> dict[str, Any]:
    """The collMod/create `validator` document for ``schema``."""
    return {"$jsonSchema": schema}


VALIDATION_LEVEL = "moderate"
# Refuse invalid writes: integrators can rely on every stored document.
VALIDATION_ACTION = "error"
