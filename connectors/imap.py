"""IMAP mailboxes: incremental by UIDVALIDITY and UID per folder, read-only, in batches.

imapclient is blocking, so each connector drives its connection from one
thread of its own; the event loop only awaits it. Between passes the same
connection waits for new mail (imap_extensions.py: IDLE, NOTIFY for every folder
where offered, else a cheap LIST-STATUS check of the others).

What can go wrong without failing the mailbox is reported in ``problems``:
a configured folder that does not exist (skipped, the others captured), a
folder restored from a backup or emptied and refilled (its UIDNEXT at or
below the checkpoint under the same UIDVALIDITY: read again from the start,
upserts by Message-ID double nothing). Folders that are gone from the server
(renamed, deleted) have their checkpoints retired and their records' source
entries marked ``gone_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import imapclient
import imapclient.imapclient
import structlog
from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

from commsync.config.models import MailboxConfig

from . import imap_extensions
from .base import Batch, CredentialsRefused, MalformedItem, RemoteItem, SourceError, StreamMissing, TemporarilyUnavailable, describe
from .mail import message_id_of
from .mailpool import MailParser, RawMail, mail_options

log = structlog.get_logger(__name__)

INBOX = "INBOX"
# UIDs per RFC822.SIZE fetch when planning batches: one short command per window.
SIZE_WINDOW = 5000
# Without NOTIFY, the folders IDLE does not watch are checked this often (seconds).
CHECK_EVERY_S = 30.0
# How long a notice (a restored folder) stays in `problems` after it was seen.
NOTICE_S = 24 * 3600.0


# UIDs per window when verify lists a folder's Message-IDs: one command each, answered in one go.
INVENTORY_WINDOW = 20_000


class FolderMissing(StreamMissing):
    """A configured folder does not exist on the server."""


class StaleCheckpoint(SourceError):
    """The folder's UIDVALIDITY is not the checkpoint's any more: its UIDs name other messages now."""


@functools.lru_cache(maxsize=32)
def tls_context(verify: bool, ca_file: Any = None) -> ssl.SSLContext:
    """Verified TLS by default; an extra CA file adds a private authority.

    One context per (verify, CA file), shared by every mailbox and connection:
    loading the system's CA bundle costs close to 1 MB of memory per context,
    which a hundred mailboxes would otherwise each pay. Contexts are safe to
    share between threads once configured.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ImapConnector:
    """One configured mailbox."""

    kind = "imap"

    def __init__(
        self,
        config: MailboxConfig,
        parser: MailParser,
        *,
        max_message_bytes: int = 25 * 1024 * 1024,
        max_batch_bytes: int = 64 * 1024 * 1024,
    ):
        self.config = config
        self.name = config.name
        self.parser = parser
        self.max_message_bytes = max_message_bytes
        self.max_batch_bytes = max_batch_bytes
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"imap-{config.name}")
        self._client: imapclient.IMAPClient | None = None
        self._in_command = False
        self._log = log.bind(source=self.name)
        # OAuth2 mailboxes log in with a bearer token (SASL XOAUTH2); None: password.
        self._tokens = _token_provider(config)
        # Messages found in the folder being read but not yet handed out (for status).
        self.backlog: int | None = None
        # (UIDVALIDITY, next UID) of each folder as of its last scan: IDLE starts
        # only if nothing arrived since, or it would sleep through that mail.
        self._scanned: dict[str, tuple[int, int]] = {}
        # Folders the next pass reads when IDLE woke us (None: all of them).
        self._wake: list[str] | None = None
        self._idle_warned = False
        # The folders of the last pass, and those of them the server does not have.
        self._folder_list: list[str] = []
        self._missing: set[str] = set()
        # Things to show until they are old: key -> (text, monotonic time seen).
        self._notices: dict[str, tuple[str, float]] = {}
        self.check_every = CHECK_EVERY_S
        # Waits that failed in a row (a server that drops IDLE), and a server that refused NOTIFY.
        self._wait_failures = 0
        self._no_notify = False

    @property
    def problems(self) -> dict[str, str]:
        """What is wrong without failing the mailbox (see the module docstring)."""
        now = time.monotonic()
        out = {f"folder:{f}": f"folder {f!r} does not exist on the server; the others are captured" for f in sorted(self._missing)}
        out |= {key: text for key, (text, seen) in self._notices.items() if now - seen < NOTICE_S}
        return out

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        def run() -> Any:
            # Set in the thread itself: a cancelled await does not stop the command.
            self._in_command = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._in_command = False

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    # -- connection ------------------------------------------------------------

    def _connect_blocking(self, fresh_token: bool = False) -> imapclient.IMAPClient:
        cfg = self.config
        context = tls_context(cfg.tls_verify, cfg.ca_file)
        timeout = cfg.timeout.total_seconds()
        client = imapclient.IMAPClient(
            cfg.host, port=cfg.effective_port, ssl=cfg.security == "tls", ssl_context=context, timeout=timeout
        )
        try:
            if cfg.security == "starttls":
                client.starttls(context)
            self._login(client, fresh_token)
        except LoginError as exc:
            _quiet_close(client)
            if _connection_lost(exc):
                # imapclient reports a dropped connection during LOGIN as a LoginError too:
                # only the server's tagged answer is a refusal.
                raise TemporarilyUnavailable(f"connection lost during login to {cfg.host}: {str(exc.__context__ or exc)}") from None
            if self._tokens is not None and not fresh_token:
                # A cached token can be revoked or expire early: one more try, on a
                # new connection (servers differ in what follows a failed AUTHENTICATE).
                self._log.info("oauth_token_refused", retry="with a fresh token")
                return self._connect_blocking(fresh_token=True)
            if self._tokens is not None:
                from .oauth import imap_refusal

                raise CredentialsRefused(f"{imap_refusal(cfg.auth.provider or '', cfg.username)} (server said: {str(exc)})") from None
            raise CredentialsRefused(f"login refused for {cfg.username}: {str(exc)}") from None
        except BaseException:
            _quiet_close(client)
            raise
        # Keep INTERNALDATE's own offset instead of converting to local naive time.
        client.normalise_times = False
        # imapclient sets imaplib's debug level to 5, so imaplib formats every response,
        # message bodies included, for a log line nobody reads: half the IMAP thread's time.
        client._imap.debug = 0
        return client

    def _login(self, client: imapclient.IMAPClient, fresh_token: bool) -> None:
        cfg = self.config
        if self._tokens is None:
            client.login(cfg.username, cfg.read_password())
        else:
            client.oauth2_login(cfg.username, self._tokens.token(force_refresh=fresh_token))

    async def _connected(self) -> imapclient.IMAPClient:
        if self._client is not None:
            try:
                await self._call(self._client.noop)
                return self._client
            except Exception:
                self._log.info("imap_reconnect")
                await self._drop()
        try:
            self._client = await self._call(self._connect_blocking)
        except (OSError, IMAPClientAbortError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise  # a configuration problem, not an outage
            raise TemporarilyUnavailable(f"cannot reach {self.config.host}:{self.config.effective_port}: {describe(exc)}") from None
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._in_command:
            # A command is still under way in our thread (a slow fetch, a server that
            # stopped answering): cut its socket, so the logout does not queue behind it.
            with contextlib.suppress(Exception):
                client.socket().shutdown(socket.SHUT_RDWR)
        await self._call(_quiet_close, client)

    def _cut(self) -> None:
        """Drop the connection under the command in flight without waiting: its thread returns at once, then closes it."""
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.socket().shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(RuntimeError):  # the thread is shut down: nothing queues behind the command
            self._thread.submit(_quiet_close, client)

    async def aclose(self) -> None:
        await self._drop()
        self._thread.shutdown(wait=False)

    async def check(self) -> str:
        client = await self._connected()
        folders = await self._folders(client)
        existing = {name for _, _, name in await self._call(client.list_folders)}
        missing = [f for f in folders if f not in existing and f.upper() != INBOX]
        if missing:
            raise FolderMissing(f"login ok, but no folder {', '.join(map(repr, missing))} on the server (it has: {', '.join(sorted(existing))})")
        return f"login ok; folders: {', '.join(folders)}"

    def check_steps(self) -> list[tuple[str, Any]]:
        """`commsync check`'s items for this mailbox: (label, async fn -> summary), in order."""
        if self._tokens is None:
            return [("", self.check)]
        return [("token", self._check_token), ("login", self.check)]

    async def _check_token(self) -> str:
        tokens = self._tokens
        assert tokens is not None
        await self._call(tokens.token)
        return f"token obtained via {tokens.label}"

    async def _folders(self, client: imapclient.IMAPClient) -> list[str]:
        if self.config.folders is not None:
            return list(self.config.folders)
        folders = [INBOX]
        sent = await self._call(client.find_special_folder, imapclient.imapclient.SENT)
        if sent and sent not in folders:
            folders.append(sent)
        return folders

    # -- sync -----------------------------------------------------------------------

    async def batches(self, state: Mapping[str, dict[str, Any]]) -> AsyncIterator[Batch]:
        """Every message newer than ``state``, folder by folder, a batch at a time."""
        try:
            client = await self._connected()
            folders = await self._folders(client)
            self._folder_list = folders
            wake, self._wake = self._wake, None
            if wake:
                # IDLE reported mail in these folders; the others wait for their poll.
                folders = [f for f in folders if f in wake] or folders
            else:
                for folder in await self._gone(client, [s for s in state if s not in folders]):
                    self._log.warning("folder_retired", folder=folder, detail="no longer on the server (renamed or deleted)")
                    yield Batch(folder, [], {}, drop_sources={"kind": "imap", "source": self.name, "folder": folder}, retired=True)
            for folder in folders:
                try:
                    async for batch in self._folder_batches(client, folder, state.get(folder)):
                        yield batch
                except FolderMissing:
                    if folder not in self._missing:
                        self._log.warning("folder_missing", folder=folder, detail="skipped; the other folders are captured")
                    self._missing.add(folder)
                    continue
                self._missing.discard(folder)
        except (OSError, IMAPClientAbortError) as exc:
            await self._drop()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise
            # The server or the network went away mid-pass: the next pass resumes from the checkpoint.
            raise TemporarilyUnavailable(f"connection to {self.config.host} lost: {describe(exc)}") from None
        except BaseException:
            # A half-read connection cannot be trusted for the next pass.
            await self._drop()
            raise

    async def _folder_batches(
        self, client: imapclient.IMAPClient, folder: str, checkpoint: dict[str, Any] | None
    ) -> AsyncIterator[Batch]:
        info = await self._examine(client, folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        uidnext = int(info.get(b"UIDNEXT") or 0)
        reset = checkpoint is not None and checkpoint.get("uidvalidity") != uidvalidity
        last_uid = 0 if checkpoint is None or reset else int(checkpoint.get("last_uid", 0))
        drop = None
        if reset:
            self._log.warning("uidvalidity_changed", folder=folder, old=checkpoint.get("uidvalidity"), new=uidvalidity)
            drop = {"kind": "imap", "source": self.name, "folder": folder, "uidvalidity": {"$ne": uidvalidity}}
        elif last_uid and 0 < uidnext <= last_uid:
            # New mail would get UIDs the checkpoint has passed and be skipped for ever:
            # the folder was restored from a backup, or emptied and refilled. Read it all again.
            text = (
                f"folder {folder!r}: UIDNEXT {uidnext} at or below the checkpoint's last UID {last_uid} under the same "
                "UIDVALIDITY (restored from a backup, or emptied and refilled): read again from the start"
            )
            self._log.warning("folder_restored", folder=folder, uidnext=uidnext, last_uid=last_uid)
            self._notices[f"restored:{folder}"] = (text, time.monotonic())
            last_uid = 0
            # Its old UIDs name other messages now.
            drop = {"kind": "imap", "source": self.name, "folder": folder, "uidvalidity": uidvalidity}

        criteria: list[Any] = ["UID", f"{last_uid + 1}:*"]
        if last_uid == 0 and self.config.since is not None:
            criteria += ["SINCE", self.config.since]
        # "n:*" always matches the highest UID, even below n.
        uids = sorted(u for u in await self._call(client.search, criteria) if u > last_uid)
        self._log.info("folder_scan", folder=folder, uidvalidity=uidvalidity, after_uid=last_uid, new=len(uids))
        self._scanned[folder] = (uidvalidity, max(uidnext, uids[-1] + 1 if uids else 0))
        self.backlog = len(uids)
        if not uids:
            if drop is not None or checkpoint is None:
                yield Batch(folder, [], {"uidvalidity": uidvalidity, "last_uid": last_uid}, drop_sources=drop)
            return

        chunks = await self._chunks(client, uids)
        # A pipeline two chunks deep: while batch n is stored, chunk n+1 is parsed on the
        # pool and chunk n+2 is fetched on the IMAP thread (fetches queue in that one thread,
        # so they stay in order). At most three chunks are in memory, each bounded by bytes.
        ahead: list[asyncio.Future[Any]] = []

        def refill(first: int) -> None:
            while len(ahead) < 2 and first + len(ahead) < len(chunks):
                ahead.append(asyncio.ensure_future(self._read(client, folder, uidvalidity, chunks[first + len(ahead)])))

        try:
            refill(0)
            for n, chunk in enumerate(chunks):
                records, skipped, malformed = await ahead.pop(0)
                refill(n + 1)  # before the batch is handed out: the next two travel while it is stored
                self.backlog = sum(len(c) for c in chunks[n + 1 :])
                yield Batch(
                    folder,
                    records,
                    {"uidvalidity": uidvalidity, "last_uid": chunk[-1]},
                    drop_sources=drop if n == 0 else None,
                    skipped=skipped,
                    malformed=malformed,
                )
        finally:
            for pending in ahead:
                pending.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)

    # -- push: IMAP IDLE (RFC 2177) -----------------------------------------------------

    @property
    def idle_folder(self) -> str:
        """The folder IDLE watches: the first configured one that exists, INBOX by default."""
        folders = [f for f in (self._folder_list or self.config.folders or [INBOX]) if f not in self._missing]
        return folders[0] if folders else INBOX

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for new mail in any configured folder; True when some came.

        With IDLE (``idle: true``, or ``auto`` when the server offers it) the
        server reports new mail and this returns at once; the next pass then
        reads only the folders that changed. With NOTIFY one IDLE watches every
        folder; without it the others are checked every ``check_every``
        seconds. Without IDLE it is a plain sleep. A connection that drops
        meanwhile counts as a change: the next pass reconnects (the runner
        backs off if it cannot) and resumes from the checkpoint.
        """
        self._wake = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.config.idle is False:
            await asyncio.sleep(timeout)
            return False
        try:
            client = await self._connected()
            if not await self._idle_offered(client):
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                return False
            main = self.idle_folder
            others = [f for f in self._folder_list if f != main and f not in self._missing]
            info = await self._examine(client, main)
            changed = {main} if imap_extensions.newer(main, int(info[b"UIDVALIDITY"]), int(info.get(b"UIDNEXT") or 0), self._scanned) else set()
            notify = bool(others) and not self._no_notify and await self._call(client.has_capability, "NOTIFY")
            try:
                if notify:
                    found = await self._call(imap_extensions.notify_set, client, others)
                    changed |= {f for f, (v, n) in found.items() if f in others and imap_extensions.newer(f, v, n, self._scanned)}
                elif others:
                    changed |= await self._check_others(client, others)
                if not changed:
                    # Nothing arrived since the scan (else IDLE would sleep through it): wait for the server.
                    changed = await self._idle_until(client, main, deadline, others if not notify else [])
            finally:
                if notify and self._client is client:
                    await self._stop_notify(client)
            self._wait_failures = 0
            if changed:
                self._log.debug("new_mail", folders=sorted(changed))
                self._wake = sorted(changed)
                return True
            return False
        except asyncio.CancelledError:
            raise
        except IMAPClientError as exc:
            if isinstance(exc, IMAPClientAbortError):
                return await self._lost(exc, deadline)
            # The server answered, and refused a command (an extension it half supports): wait
            # without it on this connector from now on, rather than pass after pass at once.
            self._log.warning("wait_command_refused", error=describe(exc), fallback="IDLE on the first folder, checks of the others")
            self._no_notify = True
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            return False
        except Exception as exc:
            return await self._lost(exc, deadline)

    async def _stop_notify(self, client: imapclient.IMAPClient) -> None:
        """NOTIFY NONE after a wait; when the server refuses it or the connection fails, drop the connection.

        What the wait found stands either way: the next pass reconnects, and a
        new connection has no notifications to stop. A refusal (BAD) turns
        NOTIFY off for this connector, as a refused NOTIFY does.
        """
        try:
            await self._call(imap_extensions.notify_none, client)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            refused = isinstance(exc, IMAPClientError) and not isinstance(exc, IMAPClientAbortError)
            self._log.warning("notify_none_failed", error=describe(exc), refused=refused)
            if refused:
                self._no_notify = True
            await self._drop()

    async def _lost(self, exc: BaseException, deadline: float) -> bool:
        """The connection went away while waiting: the next pass reconnects, after a pause if this keeps happening."""
        self._log.warning("imap_connection_lost", error=describe(exc))
        await self._drop()
        self._wait_failures += 1
        # A server that drops every IDLE must not turn the wait into a pass loop.
        pause = min(60.0, 2.0 ** (self._wait_failures - 1)) if self._wait_failures > 1 else 0.0
        await asyncio.sleep(min(pause, max(0.0, deadline - asyncio.get_running_loop().time())))
        return True

    async def _idle_until(self, client: imapclient.IMAPClient, main: str, deadline: float, poll: list[str]) -> set[str]:
        """IDLE on ``main`` until new mail or ``deadline``, re-issued every ``idle_renew``; ``poll`` checked between."""
        loop = asyncio.get_running_loop()
        renew = self.config.idle_renew.total_seconds()
        next_check = loop.time() + self.check_every
        while (left := deadline - loop.time()) > 0:
            span = min(left, renew, max(0.0, next_check - loop.time()) if poll else left)
            stop = threading.Event()
            try:
                changed = await self._call(self._idle_blocking, client, span, stop, main)
            except asyncio.CancelledError:
                stop.set()
                # The thread sleeps until the server speaks or the span ends: cut the
                # connection so that it returns now; the next pass logs in again.
                self._cut()
                raise
            if changed:
                return changed
            if poll and loop.time() >= next_check:
                changed = await self._check_others(client, poll)
                if changed:
                    return changed
                next_check = loop.time() + self.check_every
        return set()

    async def _check_others(self, client: imapclient.IMAPClient, folders: list[str]) -> set[str]:
        """The folders among ``folders`` with new mail: one LIST-STATUS where offered, else a STATUS each."""
        list_status = bool(await self._call(client.has_capability, "LIST-STATUS"))
        found = await self._call(imap_extensions.statuses, client, folders, list_status)
        return {f for f, (uidvalidity, uidnext) in found.items() if imap_extensions.newer(f, uidvalidity, uidnext, self._scanned)}

    async def _idle_offered(self, client: imapclient.IMAPClient) -> bool:
        offered = bool(await self._call(client.has_capability, "IDLE"))
        if not offered and self.config.idle is True and not self._idle_warned:
            self._idle_warned = True
            self._log.warning("idle_unsupported", detail="the server does not offer IDLE; polling instead")
        return offered

    def _idle_blocking(self, client: imapclient.IMAPClient, seconds: float, stop: threading.Event, folder: str | None = None) -> set[str]:
        """One IDLE command of at most ``seconds`` (in the connector's thread); the folders with new mail."""
        return imap_extensions.idle(client, seconds, stop, selected=folder or self.idle_folder, scanned=self._scanned)

    # -- verify and repair ------------------------------------------------------------------

    async def inventory(self, folder: str, checkpoint: Mapping[str, Any]) -> list[RemoteItem]:
        """Every message of ``folder`` up to the checkpoint's last UID: UIDs and Message-IDs, never bodies."""
        client = await self._connected()
        info = await self._examine(client, folder)
        if int(info[b"UIDVALIDITY"]) != checkpoint.get("uidvalidity"):
            raise StaleCheckpoint(f"folder {folder!r}: UIDVALIDITY changed since the last pass; the next pass reads it again")
        last = int(checkpoint.get("last_uid") or 0)
        items: list[RemoteItem] = []
        for start in range(1, last + 1, INVENTORY_WINDOW):
            end = min(last, start + INVENTORY_WINDOW - 1)
            response = await self._call(imap_extensions.fetch_range, client, start, end, ["BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]"])
            for uid in sorted(u for u in response if u <= last):
                header = _header_bytes(response[uid])
                mid = message_id_of(header) if header else None
                items.append(RemoteItem(uid, record_id=mid, label=f"UID {uid}" + (f" <{mid}>" if mid else " (no Message-ID)")))
        return items

    async def refetch(
        self, folder: str, checkpoint: Mapping[str, Any] | None, items: Sequence[tuple[Any, Mapping[str, Any]]]
    ) -> AsyncIterator[Batch]:
        """The messages ``items`` (UIDs, with the UIDVALIDITY they were seen under) of ``folder``, normalized."""
        client = await self._connected()
        info = await self._examine(client, folder)
        uidvalidity = int(info[b"UIDVALIDITY"])
        # A UID from an older UIDVALIDITY names nothing now: the folder was read again since.
        uids = sorted({int(uid) for uid, detail in items if detail.get("uidvalidity", uidvalidity) == uidvalidity})
        # The same count- and byte-bounded chunks as capture: a retry must not hold more in memory than a pass.
        for chunk in await self._chunks(client, uids):
            raw = await self._fetch(client, folder, uidvalidity, chunk)
            records, skipped, malformed = await self._normalize(raw, len(chunk), folder)
            unreadable = {m.item_id for m in malformed}
            ids = [item.source["uid"] for item in raw if item.source["uid"] not in unreadable]
            yield Batch(folder, records, {}, skipped=skipped, malformed=malformed, item_ids=ids)

    async def _chunks(self, client: imapclient.IMAPClient, uids: list[int]) -> list[list[int]]:
        """Split ``uids`` into fetches bounded by message count and by bytes.

        A count alone is not enough: 500 messages with large attachments would
        hold gigabytes in memory at once. Sizes come from one cheap
        RFC822.SIZE fetch per window of UIDs.
        """
        count, budget = self.config.batch_size, self.max_batch_bytes
        chunks: list[list[int]] = []
        current: list[int] = []
        used = 0
        for start in range(0, len(uids), SIZE_WINDOW):
            window = uids[start : start + SIZE_WINDOW]
            sizes = await self._call(client.fetch, window, ["RFC822.SIZE"])
            for uid in window:
                size = min(int(sizes.get(uid, {}).get(b"RFC822.SIZE") or 0), self.max_message_bytes)
                if current and (len(current) >= count or used + size > budget):
                    chunks.append(current)
                    current, used = [], 0
                current.append(uid)
                used += size
        if current:
            chunks.append(current)
        return chunks

    async def _fetch(self, client: imapclient.IMAPClient, folder: str, uidvalidity: int, uids: list[int]) -> list[RawMail]:
        limit = self.max_message_bytes
        # A partial fetch caps what one huge message costs; small ones arrive whole.
        items = [f"BODY.PEEK[]<0.{limit}>", "INTERNALDATE", "RFC822.SIZE"]
        # Gmail shows one message in several folders (its labels); X-GM-MSGID names it across them.
        gmail = await self._call(client.has_capability, "X-GM-EXT-1")
        response = await self._call(client.fetch, uids, items + ["X-GM-MSGID"] if gmail else items)
        out = []
        for uid in uids:
            data = response.get(uid)
            body = _body(data) if data else None
            if body is None:
                # Expunged between SEARCH and FETCH: nothing to capture.
                self._log.info("message_vanished", folder=folder, uid=uid)
                continue
            size = int(data.get(b"RFC822.SIZE") or len(body))
            source = {"kind": "imap", "source": self.name, "folder": folder, "uidvalidity": uidvalidity, "uid": uid}
            if data.get(b"X-GM-MSGID") is not None:
                # A string: the id is an unsigned 64-bit number, beyond BSON's int64.
                source["gmail_msgid"] = str(data[b"X-GM-MSGID"])
            out.append(
                RawMail(
                    raw=body,
                    received_at=_utc(data.get(b"INTERNALDATE")),
                    truncated=size > len(body),
                    source=source,
                )
            )
        return out

    async def _read(self, client: imapclient.IMAPClient, folder: str, uidvalidity: int, uids: list[int]) -> tuple[list[dict[str, Any]], int, list[MalformedItem]]:
        """Fetch ``uids``, then parse them: one chunk's records, skipped count and unreadable items."""
        raw = await self._fetch(client, folder, uidvalidity, uids)
        return await self._normalize(raw, len(uids), folder)

    async def _normalize(self, raw: list[RawMail], asked: int, folder: str) -> tuple[list[dict[str, Any]], int, list[MalformedItem]]:
        """Records of ``raw``; vanished messages are skipped, ones that cannot be parsed go to quarantine."""
        records, malformed = [], []
        for item, (record, reason) in zip(raw, await self.parser.parse(raw), strict=True):
            if record is None:
                self._log.warning("message_not_parsed", folder=folder, uid=item.source["uid"], reason=reason)
                detail = {"uidvalidity": item.source["uidvalidity"]}
                malformed.append(MalformedItem(reason or "not parsed", item_id=item.source["uid"], stream=folder, detail=detail))
            else:
                records.append(record)
        return records, asked - len(raw), malformed

    async def _examine(self, client: imapclient.IMAPClient, folder: str) -> Mapping[bytes, Any]:
        """Open ``folder`` read-only (EXAMINE, as well as BODY.PEEK: capture never changes flags)."""
        try:
            return await self._call(client.select_folder, folder, readonly=True)
        except IMAPClientError as exc:
            if _nonexistent(exc):
                raise FolderMissing(f"no folder {folder!r}: {str(exc)}") from None
            raise

    async def _gone(self, client: imapclient.IMAPClient, streams: list[str]) -> list[str]:
        """Which of ``streams`` (folders with a checkpoint but no longer read) the server no longer has."""
        gone = []
        for folder in streams:
            try:
                await self._call(client.folder_status, folder, [b"UIDVALIDITY"])
            except IMAPClientError as exc:
                if _nonexistent(exc):
                    gone.append(folder)
        return gone


def _token_provider(config: MailboxConfig) -> Any:
    """OAuth2 token provider of the mailbox, or None for a password login (HTTP libraries only load for OAuth2)."""
    if config.auth.method != "oauth2":
        return None
    from .oauth import token_provider

    return token_provider(config)


# What servers without RFC 5530 response codes say for a folder that is not there:
# Dovecot and Cyrus "Mailbox doesn't exist" / "does not exist", Gmail "Unknown
# Mailbox", UW-IMAP and others "no such mailbox", Exchange "The specified folder
# could not be found in the store". Anything else (a quota, a lock, "[ALREADYEXISTS]")
# is not a missing folder and must never retire one.
_MISSING_PHRASES = (
    "mailbox doesn't exist",
    "mailbox does not exist",
    "unknown mailbox",
    "no such mailbox",
    "folder could not be found",
)


def _nonexistent(exc: BaseException) -> bool:
    """True when the server said the folder does not exist: RFC 5530 [NONEXISTENT], or one of the known phrases."""
    text = str(exc).lower()
    return "[nonexistent]" in text or any(phrase in text for phrase in _MISSING_PHRASES)


def _header_bytes(data: Mapping[bytes, Any]) -> bytes | None:
    for key, value in data.items():
        if key.startswith(b"BODY[HEADER.FIELDS") and value is not None:
            return bytes(value)
    return None


def _body(data: Mapping[bytes, Any]) -> bytes | None:
    for key, value in data.items():
        if key.startswith(b"BODY[]") and value is not None:
            return bytes(value)
    return None


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _connection_lost(exc: LoginError) -> bool:
    """True when a LoginError wraps a dropped connection rather than the server's refusal."""
    cause = exc.__context__
    return isinstance(cause, IMAPClientAbortError | OSError) or "socket error" in str(exc).lower()


def _quiet_close(client: imapclient.IMAPClient) -> None:
    try:
        client.logout()
    except Exception:
        try:
            client.shutdown()
        except Exception:
            pass


def build(config: MailboxConfig, ctx: Any) -> ImapConnector:
    """The connector of one configured mailbox (see connectors/registry.py)."""
    settings = ctx.settings
    return ImapConnector(
        config,
        MailParser(mail_options(settings, config.own_addresses), ctx.pool),
        max_message_bytes=settings.capture.max_message_bytes,
        max_batch_bytes=settings.capture.max_batch_bytes,
    )
