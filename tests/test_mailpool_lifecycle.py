"""The parse pool's processes live and die with the daemon: `commsync run` as a real process tree.

The pool is a forkserver, its workers (the forkserver's children) and the
multiprocessing resource tracker. After `kill -9` of the daemon none of them
may linger; after SIGTERM the daemon ends them all before it exits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from commsync.connectors import lifeline
from commsync.connectors.mailpool import ParsePool

from eventually import eventually
from mailgen import message

COMMSYNC = Path(sys.executable).with_name("commsync")  # the console script the package installs


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, from /proc; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> dict[int, int]:
    """Every live process below ``root``: pid -> start time (which tells a reused pid apart)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[1] != "Z":
            children.setdefault(stat[0], []).append((int(entry), stat[2]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, start in children.get(todo.pop(), ()):
            found[pid] = start
            todo.append(pid)
    return found


def alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[1] not in ("Z", "X")


def survivors(tree: dict[int, int]) -> list[str]:
    return [f"{pid} {_cmdline(pid)}" for pid, start in tree.items() if alive(pid, start)]


def start_daemon(dovecot, imap_user, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    for i in range(6):
        dovecot.append(imap_user.name, "INBOX", message(i))
    config = tmp_path / "commsync.yaml"
    config.write_text(
        json.dumps(
            {
                "mongodb": {"uri": "memory://"},
                "daemon": {"poll_interval": "1s", "parse_workers": 2},
                "mailboxes": [dovecot.mailbox(imap_user, password=None, password_env="TEST_IMAP_PASSWORD", folders=["INBOX"])],
            }
        )
    )
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(COMMSYNC), "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "TEST_IMAP_PASSWORD": imap_user.password},
            start_new_session=True,  # its own session: nothing of ours is in its tree, nothing of its in ours
        )
    return proc, log


def pool_running(proc: subprocess.Popen, log: Path) -> dict[int, int] | None:
    """The daemon's process tree once it has parsed mail: forkserver, a worker under it, resource tracker."""
    if not any(json.loads(line).get("event") == "batch_stored" for line in log.read_text().splitlines() if line.startswith("{")):
        return None
    tree = descendants(proc.pid)
    forkservers = [pid for pid in tree if "multiprocessing.forkserver" in _cmdline(pid) and _stat(pid)[0] == proc.pid]
    trackers = [pid for pid in tree if "multiprocessing.resource_tracker" in _cmdline(pid)]
    workers = [pid for pid in tree if forkservers and _stat(pid)[0] == forkservers[0]]
    return tree if forkservers and trackers and workers else None


def kill_leftovers(proc: subprocess.Popen, tree: dict[int, int]) -> None:
    """A failing test must not leave its processes behind: end them by pid."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid, start in tree.items():
        if alive(pid, start):
            os.kill(pid, signal.SIGKILL)


async def test_kill_9_of_the_daemon_ends_every_pool_process(dovecot, imap_user, tmp_path):
    proc, log = start_daemon(dovecot, imap_user, tmp_path)
    tree: dict[int, int] = {}
    try:
        tree = await eventually(lambda: pool_running(proc, log), timeout=60, what="the daemon has parsed mail in its pool")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        await eventually(lambda: not survivors(tree), timeout=5, what=f"every process of the former tree gone: {survivors(tree)}")
    finally:
        kill_leftovers(proc, tree)


async def test_sigterm_shuts_the_pool_down_before_the_daemon_exits(dovecot, imap_user, tmp_path):
    proc, log = start_daemon(dovecot, imap_user, tmp_path)
    tree: dict[int, int] = {}
    try:
        tree = await eventually(lambda: pool_running(proc, log), timeout=60, what="the daemon has parsed mail in its pool")
        tree.update(descendants(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        # Checked at once, not eventually: systemd looks for leftovers as soon as the main process is gone.
        assert survivors(tree) == []
        events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
        assert events[-1] == "stopped"
        assert all(line.startswith("{") for line in log.read_text().splitlines()), "only JSON log lines (no warnings) on stderr"
    finally:
        kill_leftovers(proc, tree)


def test_shutdown_stops_the_forkserver_and_the_tracker_and_no_later_child_arms_itself():
    import multiprocessing.forkserver
    from multiprocessing import resource_tracker

    pool = ParsePool(1)
    try:
        assert multiprocessing.forkserver._forkserver._forkserver_pid is not None
        # Only the forkserver saw the owner variable: a later child of this process must not arm its lifeline.
        assert lifeline.OWNER_ENV not in os.environ
    finally:
        pool.shutdown()
    assert multiprocessing.forkserver._forkserver._forkserver_pid is None
    assert resource_tracker._resource_tracker._pid is None

