"""Assembly: settings in, store and connectors out. The CLI's commands share it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from commsync.config.models import Settings
from commsync.connectors import registry
from commsync.connectors.base import Connector
from commsync.connectors.mailpool import MailParser, ParsePool, mail_options

from . import retry
from .policy import from_settings as capture_policy

if TYPE_CHECKING:
    from .store import Store


def open_store(settings: Settings) -> Store:
    """The configured store (not yet contacted)."""
    from .store import Store

    m = settings.mongodb
    store = Store.connect(
        m.uri,
        m.database,
        customers=settings.customers.collection,
        timeout_ms=int(m.server_selection_timeout.total_seconds() * 1000),
        socket_timeout_ms=int(m.socket_timeout.total_seconds() * 1000),
        default_region=settings.default_region,
    )
    store.capture = capture_policy(settings)
    return store


def parse_workers(settings: Settings) -> int:
    return settings.daemon.parse_workers or os.cpu_count() or 1


@contextmanager
def parse_pool(settings: Settings) -> Iterator[ParsePool]:
    """Processes that parse mail, one per core unless configured."""
    pool = ParsePool(parse_workers(settings))
    try:
        yield pool
    finally:
        pool.shutdown()


def mail_parser(settings: Settings, pool: ParsePool | None, own_addresses: frozenset[str]) -> MailParser:
    return MailParser(mail_options(settings, own_addresses), pool, workers=parse_workers(settings))


def all_own_addresses(settings: Settings) -> frozenset[str]:
    """Every configured mailbox's own addresses (for archives that belong to none)."""
    return frozenset().union(*(m.own_addresses for m in settings.sources_of("imap")))


def build_connectors(settings: Settings, pool: ParsePool | None) -> list[Connector]:
    """One connector per configured source, kind by kind (see connectors/registry.py)."""
    context = registry.BuildContext(settings, pool)
    return [registry.kind_of(source).build(source, context) for source in settings.sources()]


def retry_policy(settings: Settings) -> retry.RetryPolicy:
    """The failure schedule the daemon settings ask for."""
    d = settings.daemon
    park = d.park_after if d.park_after > timedelta(0) else None
    return retry.RetryPolicy(backoff_max=d.backoff_max, auth_backoff_max=d.auth_backoff_max, park_after=park)


def source_names(settings: Settings) -> str:
    """The settings keys that list sources, for messages: "mailboxes, twilio_accounts"."""
    return ", ".join(k.settings_key for k in registry.kinds())
