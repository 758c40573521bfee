"""Which IMAP error texts mean "this folder does not exist" (pure strings, no server)."""

from __future__ import annotations

import pytest
from imapclient.exceptions import IMAPClientError

from commsync.connectors.imap import _nonexistent


@pytest.mark.parametrize(
    "text",
    [
        "select failed: [NONEXISTENT] Mailbox doesn't exist: Gone",  # Dovecot
        "select failed: [NONEXISTENT] Unknown Mailbox: Gone (Failure)",  # Gmail
        "examine failed: Mailbox doesn't exist: Gone",  # Dovecot without the code
        "select failed: Mailbox does not exist",  # Cyrus
        "select failed: No such mailbox",  # UW-IMAP
        "select failed: The specified folder could not be found in the store.",  # Exchange
        "status failed: [NONEXISTENT] anything at all",
    ],
)
def test_a_missing_folder_is_recognised(text):
    assert _nonexistent(IMAPClientError(text))


@pytest.mark.parametrize(
    "text",
    [
        "create failed: [ALREADYEXISTS] Mailbox already exists",
        "select failed: [LIMIT] Too many sessions; the message that existed is busy",
        "select failed: [INUSE] Mailbox is locked; try again once it exists again",
        "select failed: Internal error occurred. Refer to server log for more information.",
        "status failed: [SERVERBUG] the record could not be found",
    ],
)
def test_an_unrelated_error_never_means_a_missing_folder(text):
    assert not _nonexistent(IMAPClientError(text))


def test_a_normalizer_crash_is_described_at_the_common_length(monkeypatch):
    from commsync.connectors import mailpool
    from commsync.connectors.base import ERROR_CHARS

    def crash(*args, **kwargs):
        raise ValueError("x" * 2000)

    monkeypatch.setattr(mailpool, "normalize_email", crash)
    options = mailpool.MailOptions(frozenset(), frozenset(), 1000)
    ((record, reason),) = mailpool.normalize_many([mailpool.RawMail(raw=b"x", received_at=None, truncated=False, source={})], options)
    assert record is None and reason.startswith("ValueError: xxx") and len(reason) == ERROR_CHARS


async def test_an_unreachable_server_is_described_at_the_common_length(dovecot, imap_user, monkeypatch):
    from commsync.config import settings_from_dict
    from commsync.connectors.base import ERROR_CHARS, TemporarilyUnavailable
    from commsync.daemon import app

    box = dovecot.mailbox(imap_user, addresses=[f"{imap_user.name}@ourco.example"])
    (connector,) = app.build_connectors(settings_from_dict({"mongodb": {"uri": "memory://"}, "mailboxes": [box]}), None)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("y" * 2000)

    monkeypatch.setattr(connector, "_connect_blocking", refused)
    try:
        with pytest.raises(TemporarilyUnavailable) as exc:
            await connector._connected()
    finally:
        await connector.aclose()
    described = str(exc.value).split(": ", 1)[1]
    assert described.startswith("ConnectionRefusedError: yyy") and len(described) == ERROR_CHARS
