"""Checks of the real-Dovecot test fixture (tests/dovecot.py)."""

import datetime as dt
import os
import ssl
import time

import imapclient
import pytest
from imapclient.exceptions import LoginError

import dovecot as dovecot_mod
from dovecot import DovecotServer

# The `dovecot` and `imap_user` fixtures come from tests/conftest.py
# (`from dovecot import dovecot, imap_user`).  Importing them here as well
# would define a second session fixture and start a second server.


def _msg(n: int, subject: str = "hello") -> bytes:
    return (
        f"From: Alice <alice@example.com>\r\n"
        f"To: Bob <bob@example.com>\r\n"
        f"Subject: {subject} {n}\r\n"
        f"Message-ID: <msg-{n}-{time.time_ns()}@example.com>\r\n"
        f"Date: Mon, 02 Jun 2025 10:0{n}:00 +0000\r\n"
        f"\r\n"
        f"Body of message {n}.\r\n"
    ).encode()


def test_plain_login(dovecot, imap_user):
    c = dovecot.client(*imap_user)
    try:
        info = c.select_folder("INBOX")
        assert info[b"EXISTS"] == 0
        assert c.host == "127.0.0.1" and dovecot.host == "127.0.0.1"
    finally:
        c.logout()


def test_wrong_password_rejected(dovecot, imap_user):
    with pytest.raises(LoginError):
        dovecot.client(imap_user.name, imap_user.password + "x")


def test_user_added_while_running(dovecot):
    dovecot.add_user("late-comer", "s3cret-pw")
    c = dovecot.client("late-comer", "s3cret-pw")
    c.logout()


def test_starttls_login_verified_against_ca(dovecot, imap_user):
    ctx = ssl.create_default_context(cafile=dovecot.ca_file)
    c = imapclient.IMAPClient(dovecot.host, port=dovecot.port, ssl=False, timeout=10)
    try:
        assert b"STARTTLS" in c.capabilities()
        c.starttls(ctx)
        assert isinstance(c._imap.sock, ssl.SSLSocket)
        c.login(*imap_user)
        c.select_folder("INBOX")
    finally:
        c.logout()


def test_imaps_login_verified_against_ca(dovecot, imap_user):
    ctx = ssl.create_default_context(cafile=dovecot.ca_file)
    c = imapclient.IMAPClient(
        dovecot.host, port=dovecot.tls_port, ssl=True, ssl_context=ctx, timeout=10
    )
    try:
        c.login(*imap_user)
        cert = c._imap.sock.getpeercert()
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    finally:
        c.logout()


def test_imaps_rejects_unknown_ca(dovecot):
    ctx = ssl.create_default_context()  # system CAs only: our test CA is unknown
    with pytest.raises(ssl.SSLCertVerificationError):
        imapclient.IMAPClient(
            dovecot.host, port=dovecot.tls_port, ssl=True, ssl_context=ctx, timeout=10
        )


def test_append_and_fetch_with_peek_keeps_unseen(dovecot, imap_user):
    raws = [_msg(i) for i in range(1, 4)]
    when = dt.datetime(2025, 6, 2, 12, 0, tzinfo=dt.UTC)
    uids = [dovecot.append(imap_user.name, "INBOX", raw, msg_time=when) for raw in raws]
    assert uids == sorted(uids) and len(set(uids)) == 3

    c = dovecot.client(*imap_user)
    try:
        c.select_folder("INBOX")
        data = c.fetch(uids, ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
        assert [data[u][b"BODY[]"] for u in uids] == raws
        for u in uids:
            assert data[u][b"INTERNALDATE"].astimezone(dt.UTC) == when
        flags = c.get_flags(uids)
        assert all(b"\\Seen" not in flags[u] for u in uids)
    finally:
        c.logout()


def test_append_with_flags_to_new_folder(dovecot, imap_user):
    uid = dovecot.append(imap_user.name, "Projects/ACME", _msg(1), flags=[r"\Flagged"])
    c = dovecot.client(*imap_user)
    try:
        c.select_folder("Projects/ACME", readonly=True)
        assert b"\\Flagged" in c.get_flags([uid])[uid]
    finally:
        c.logout()


def test_users_do_not_share_mail(dovecot, imap_user):
    other = dovecot.new_user()
    dovecot.append(other.name, "INBOX", _msg(1))
    c = dovecot.client(*imap_user)
    try:
        assert c.select_folder("INBOX")[b"EXISTS"] == 0
    finally:
        c.logout()


@pytest.mark.parametrize("folder", ["INBOX", "Archive"])
def test_reset_uidvalidity_keeps_messages(dovecot, imap_user, folder):
    raws = [_msg(i) for i in range(1, 4)]
    old_uids = [dovecot.append(imap_user.name, folder, raw) for raw in raws]
    c = dovecot.client(*imap_user)
    try:
        old_validity = c.select_folder(folder)[b"UIDVALIDITY"]
        c.add_flags([old_uids[0]], [b"\\Seen"])
    finally:
        c.logout()

    new_validity = dovecot.reset_uidvalidity(imap_user.name, folder)
    assert new_validity != old_validity

    c = dovecot.client(*imap_user)
    try:
        info = c.select_folder(folder)
        assert info[b"UIDVALIDITY"] == new_validity
        uids = c.search("ALL")
        assert set(uids).isdisjoint(old_uids)  # messages were renumbered
        data = c.fetch(uids, ["BODY.PEEK[]", "FLAGS"])
        assert sorted(d[b"BODY[]"] for d in data.values()) == sorted(raws)
        seen = [d[b"BODY[]"] for d in data.values() if b"\\Seen" in d[b"FLAGS"]]
        assert seen == [raws[0]]  # flags survive the reset
    finally:
        c.logout()


def test_special_use_sent_folder(dovecot, imap_user):
    c = dovecot.client(*imap_user)
    try:
        assert b"SPECIAL-USE" in c.capabilities()
        assert c.find_special_folder(imapclient.imapclient.SENT) == "Sent"
        flags_by_name = {name: flags for flags, _, name in c.list_folders()}
        assert b"\\Sent" in flags_by_name["Sent"]
        assert {"Drafts", "Trash", "Archive"} <= set(flags_by_name)
        assert "Sent" in {name for _, _, name in c.list_sub_folders()}
    finally:
        c.logout()


def test_idle_and_uidplus_advertised(dovecot, imap_user):
    c = dovecot.client(*imap_user)
    try:
        caps = c.capabilities()
        assert b"IDLE" in caps and b"UIDPLUS" in caps
        assert c.has_capability("IDLE")
        c.select_folder("INBOX")
        c.idle()
        dovecot.append(imap_user.name, "INBOX", _msg(1))
        responses = c.idle_check(timeout=5)
        c.idle_done()
        assert (1, b"EXISTS") in responses
    finally:
        c.logout()


@pytest.mark.integration
def test_standalone_server_starts_fast_and_stops():
    dovecot_mod.require_dovecot()
    with DovecotServer() as server:
        assert server.startup_seconds < 2
        assert server.port != server.tls_port
        server.add_user("solo", "pw")
        c = server.client("solo", "pw")
        c.logout()
        tmpdir = server.tmpdir
    assert not server.running
    assert not os.path.exists(tmpdir)


@pytest.mark.integration
def test_many_clients_config_holds_more_sessions_than_dovecots_default_limit():
    # Dovecot's default of 100 processes per service stops the 101st TLS session;
    # the benchmark of hundreds of mailboxes needs them all open at once.
    dovecot_mod.require_dovecot()
    sessions = 120
    with DovecotServer(extra_config=dovecot_mod.many_clients_config(sessions)) as server:
        assert server.settings("service/imap/process_limit") == {"service/imap/process_limit": str(sessions + 100)}
        server.add_user("many", "pw")
        clients = []
        try:
            for _ in range(sessions):
                c = server.tls_client("many", timeout=5)
                c.select_folder("INBOX", readonly=True)
                clients.append(c)
            assert all(c.noop() for c in clients)
        finally:
            for c in clients:
                c.logout()


@pytest.mark.integration
def test_extra_config_with_an_unknown_setting_is_refused_before_start():
    dovecot_mod.require_dovecot()
    server = DovecotServer(extra_config="service imap {\n  proces_limit = 3\n}\n")
    with pytest.raises(ValueError, match="proces_limit"):
        server.start()
    assert not server.running
    assert not os.path.exists(server.tmpdir)
