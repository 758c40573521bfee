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
