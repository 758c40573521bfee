"""`commsync status`: every source as MongoDB knows it, readable while daemons run elsewhere."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from commsync.config import Settings
from commsync.connectors import registry

from . import app
from .clock import aware
from .text import cut, describe, field_name, json_default

COLUMNS = ("SOURCE", "KIND", "OWNER", "STATE", "LAST SUCCESS", "NEWEST", "VERIFIED", "FAILS", "BACKLOG", "LAST ERROR")


async def show_status(settings: Settings, args: Any) -> int:
    """Print the status table (or JSON with --json); 1 when MongoDB cannot be read."""
    store = app.open_store(settings)
    try:
        statuses, leases, instances = await store.source_overview()
    except Exception as exc:
        print(f"commsync: cannot read the status from MongoDB: {describe(exc)}", file=sys.stderr)
        return 1
    finally:
        store.close()
    now = datetime.now(UTC)
    rows = status_rows(settings.sources(), statuses, leases, now, lease_ttl=settings.daemon.lease_ttl)
    if getattr(args, "json", False):
        print(json.dumps({"sources": rows, "instances": _instances(instances, now)}, default=json_default, indent=2))
    else:
        print(render(rows, _instances(instances, now), now))
    return 0


def status_rows(
    configured: Sequence[Any],
    statuses: Sequence[Mapping[str, Any]],
    leases: Sequence[Mapping[str, Any]],
    now: datetime,
    *,
    lease_ttl: timedelta = timedelta(seconds=60),
) -> list[dict[str, Any]]:
    """One row per source: the configured ones in file order, then any others MongoDB remembers."""
    by_name = {s["_id"]: s for s in statuses}
    live = {lease["_id"]: lease for lease in leases if aware(lease.get("expires_at")) and aware(lease["expires_at"]) > now}
    expired = {lease["_id"]: aware(lease.get("expires_at")) for lease in leases if lease["_id"] not in live}
    names = [c.name for c in configured]
    in_config = set(names)
    names += sorted(n for n in by_name if n not in in_config)
    rows = []
    for name in names:
        doc = by_name.get(name, {})
        lease = live.get(name)
        unowned_since = None
        if lease is not None:
            state = doc.get("state") or "starting"
        elif doc.get("state") == "parked":
            state = "parked"
        elif doc:
            state = "no owner"
            unowned_since = expired.get(name) or aware(doc.get("updated_at"))
        else:
            state = "never run"
        rows.append(
            {
                "source": name,
                "kind": doc.get("kind") or _kind_of(configured, name),
                "owner": lease["owner"] if lease is not None else None,
                "lease_expires": aware(lease["expires_at"]) if lease is not None else None,
                "state": state,
                "in_config": name in in_config,
                "last_success": aware(doc.get("last_success")),
                "last_batch_at": aware(doc.get("last_batch_at")),
                "consecutive_failures": doc.get("consecutive_failures", 0),
                "backlog": doc.get("backlog"),
                "last_error": doc.get("last_error"),
                "last_error_at": aware(doc.get("last_error_at")),
                "newest_item_at": aware(doc.get("newest_item_at")),
                "verified_at": aware(doc.get("verified_at")),
                "verified": {field_name(k): v for k, v in (doc.get("verified") or {}).items()},
                "problems": dict(doc.get("problems") or {}),
                "parked_reason": doc.get("parked_reason") if state == "parked" else None,
                "refused_since": aware(doc.get("refused_since")),
                "unowned_since": unowned_since,
                # A configured source nobody has worked for longer than a lease: a gap in capture, not a pause.
                "unowned_too_long": bool(name in in_config and unowned_since and now - unowned_since > lease_ttl),
            }
        )
    return rows


def render(rows: Sequence[Mapping[str, Any]], instances: Sequence[Mapping[str, Any]], now: datetime) -> str:
    """A plain-text table, one source per line, then the live instances."""
    table = [COLUMNS]
    for r in rows:
        error = r["last_error"] or "-"
        if r["last_error"] and r["last_error_at"]:
            error = f"{ago(r['last_error_at'], now)}: {error}"
        table.append(
            (
                r["source"] + ("" if r["in_config"] else " (not in config)"),
                r["kind"] or "?",
                r["owner"] or "-",
                r["state"],
                _when(r["last_success"], now),
                ago(r["newest_item_at"], now).removesuffix(" ago") if r["newest_item_at"] else "-",
                _verified(r, now),
                str(r["consecutive_failures"] or 0),
                "?" if r["backlog"] is None else str(r["backlog"]),
                cut(error, 70),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    lines = []
    for n, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n:
            lines += [f"    ! {note}" for note in notes(rows[n - 1], now)]
    alive = [i for i in instances if i["alive"]]
    lines.append("")
    lines.append(f"instances alive: {len(alive)}" + "".join(f"\n  {i['owner']} (seen {ago(i['seen_at'], now)})" for i in alive))
    return "\n".join(lines)


def _instances(docs: Sequence[Mapping[str, Any]], now: datetime) -> list[dict[str, Any]]:
    out = []
    for d in docs:
        expires = aware(d.get("expires_at"))
        out.append({"owner": d["_id"], "alive": bool(expires and expires > now), "seen_at": aware(d.get("seen_at")), "host": d.get("host")})
    return out


def _kind_of(configured: Sequence[Any], name: str) -> str | None:
    for c in configured:
        if c.name == name:
            return registry.kind_of(c).name
    return None


def _when(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S}Z ({ago(value, now)})"


def ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = max(0, int((now - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def notes(row: Mapping[str, Any], now: datetime) -> list[str]:
    """What a human must see about a source besides its table row: parking, gaps, problems, incomplete verifies."""
    out = []
    if row.get("parked_reason"):
        out.append(f"parked: {row['parked_reason']}; fix the credentials and reload, or `commsync source resume {row['source']}`")
    elif row.get("refused_since"):
        out.append(f"credentials refused since {_when(row['refused_since'], now)}")
    if row.get("unowned_too_long"):
        out.append(f"no instance has worked it for {ago(row['unowned_since'], now).removesuffix(' ago')}: is a daemon with it in its config running?")
    out += [cut(text, 160) for _, text in sorted(row.get("problems", {}).items())]
    for stream, v in sorted(row.get("verified", {}).items()):
        if v.get("error"):
            out.append(f"verify {stream}: {cut(v['error'], 120)}")
        elif v.get("missing") or v.get("quarantined"):
            out.append(f"verify {stream}: {v.get('missing', 0)} missing, {v.get('quarantined', 0)} quarantined (`commsync verify --source {row['source']}`)")
    return out


def _verified(row: Mapping[str, Any], now: datetime) -> str:
    if not row.get("verified_at"):
        return "-"
    bad = sum((v.get("missing") or 0) + (v.get("quarantined") or 0) for v in row.get("verified", {}).values())
    errors = any(v.get("error") for v in row.get("verified", {}).values())
    verdict = "ok" if not bad and not errors else f"{bad} open" if bad else "error"
    return f"{verdict} {ago(row['verified_at'], now)}"
