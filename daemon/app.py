"""Assembly: settings in, store and connectors out. The CLI's commands share it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from commsync.config.models import Settings
from commsync.connectors.base import Connector
from commsync.connectors.imap import ImapConnector
from commsync.connectors.parsing import MailOptions, MailParser, ParsePool
from commsync.connectors.twilio import TwilioConnector

from .policy import from_settings as capture_policy
from .store import Store


def open_store(settings: Settings) -> Store:
    """The configured store (not yet contacted)."""
    m = settings.mongodb
    store = Store.connect(
        m.uri,
        m.database,
        customers=settings.customers.collection,
        timeout_ms=int(m.server_selection_timeout.total_seconds() * 1000),
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
    options = MailOptions(
        own_addresses=own_addresses,
        internal_domains=frozenset(settings.internal_domains),
        max_content_chars=settings.capture.max_content_chars,
    )
    return MailParser(options, pool, workers=parse_workers(settings))


def all_own_addresses(settings: Settings) -> frozenset[str]:
    """Every configured mailbox's own addresses (for archives that belong to none)."""
    return frozenset().union(*(m.own_addresses for m in settings.mailboxes))


def build_connectors(settings: Settings, pool: ParsePool | None) -> list[Connector]:
    """One connector per configured source: mailboxes, then Twilio accounts."""
    connectors: list[Connector] = [
        ImapConnector(
            mailbox,
            mail_parser(settings, pool, mailbox.own_addresses),
            max_message_bytes=settings.capture.max_message_bytes,
            max_batch_bytes=settings.capture.max_batch_bytes,
        )
        for mailbox in settings.mailboxes
    ]
    connectors += [
        TwilioConnector(account, default_region=settings.default_region, max_content_chars=settings.capture.max_content_chars)
        for account in settings.twilio_accounts
    ]
    return connectors
