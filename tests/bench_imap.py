#!/usr/bin/env python3
"""IMAP capture benchmark: commsync vs mbsync vs a bare imapclient loop, on two corpora.

Run by hand (pytest collects ``test_*.py`` only, so this file is never
collected)::

    .venv/bin/python tests/bench_imap.py --messages 10000 --runs 3 --double-runs 3

What it does, for each corpus of ``--corpus`` (``tests/bench_corpus.py``:
``business``, generated business mail of about 9 KiB on average with a heavy
tail, newsletters, attachments, forwards, quoted threads and legacy charsets;
``small``, the original 4 KiB corpus), each in a mailbox of its own:

1. starts the private test Dovecot (``tests/dovecot.py``), creates a user and
   fills its INBOX with N generated messages (MULTIAPPEND, a few MB per
   command, one connection);
2. for each of ``--runs``, times on the same mailbox

   * ``mbsync`` (Debian isync) pulling INBOX into a fresh Maildir over the
     plain port, once with ``FSync no`` (the strictest baseline: no disk
     flushes, like commsync's dry run) and once with isync's defaults;
   * a bare imapclient ``UID FETCH BODY.PEEK[]`` loop (chunks of
     ``--batch-size``), which neither parses nor stores anything: the limit;
   * ``commsync run --once --dry-run -c CFG`` (the real CLI), stdout to
     /dev/null;
   (``commsync verify`` of the synced folder is timed by ``bench_verify.py``: it
   needs a store holding the mailbox, which a dry run does not make);

   every tool runs as a fresh child process (under GNU time); wall time is
   measured around it and memory two ways: GNU time's ``%M`` (``ru_maxrss``
   of the largest single process among the tool and the descendants it
   reaped) and the peak of the summed RSS and PSS (``/proc/PID/smaps_rollup``)
   of the whole process tree, sampled every 50 ms (this counts the
   forkserver, the parse pool's workers and the resource tracker, which run
   concurrently; PSS counts a page they share once), with the tree's
   per-process breakdown at the PSS peak;
   a dry run before the timed ones warms Dovecot's caches and checks that
   commsync printed exactly N JSON lines (one per message, distinct UIDs);
3. appends another N messages and runs every tool ``--double-runs`` times at
   2N, to show that commsync's memory does not grow with the mailbox;
4. times the parse alone on one core (email ``compat32`` / ``policy.default``
   / ``normalize_email``) on the same generated messages, for reference.

The machine is shared in development, and a 2-core benchmark is easily
skewed: before each run the script waits (``--quiet-cpus``,
``--quiet-timeout``) until other processes are idle, and reports per run the
CPU that other user-space processes used while it ran. It also records a
fingerprint of the product sources and says if they changed mid-run.

The result is markdown on stdout (``--markdown FILE`` also writes it to
FILE, with the command line): first a summary table for the README (messages/s
per tool and corpus, commsync / mbsync with its defaults, commsync's memory),
then every run, then commsync's memory per process. Exit status 1 when a
measurement failed (the others are still reported).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

REPO = HERE.parent
DEFAULT_COMMSYNC = str(REPO / ".venv" / "bin" / "commsync")
if not os.path.exists(DEFAULT_COMMSYNC):
    DEFAULT_COMMSYNC = shutil.which("commsync") or DEFAULT_COMMSYNC
MBSYNC = os.environ.get("COMMSYNC_BENCH_MBSYNC", "/usr/bin/mbsync")
TIME_BIN = "/usr/bin/time"  # GNU time (Debian package "time")
# Before each timed run, wait until other processes use at most this many CPUs
# (a shared machine running test suites skews a 2-core benchmark badly).
QUIET_CPUS = 0.15
QUIET_TIMEOUT = 120.0
SERVER_PID: int | None = None  # the Dovecot master, whose CPU counts as the benchmark's

from bench_corpus import CORPORA, CORPUS_DESCRIPTIONS, OWN_ADDRESS, OWN_DOMAIN  # noqa: E402  (after sys.path)

Corpus = Callable[[int, int], bytes]

# --------------------------------------------------------------------------- measuring


@dataclass
class ProcMem:
    """One process of a tool's tree at the moment the tree's summed PSS peaked (KiB)."""

    role: str
    rss: int
    pss: int
    uss: int  # private pages (Private_Clean + Private_Dirty): what ending it would free


@dataclass
class Measure:
    tool: str
    messages: int
    seconds: float
    maxrss_mb: float  # ru_maxrss of the tool and its reaped descendants (the largest one)
    tree_mb: float  # sampled peak of the summed RSS of the process tree
    tree_pss_mb: float  # the same for PSS (shared pages split among processes)
    count: int | None = None  # items the tool reported (when it reports)
    note: str = ""
    background: float = 0.0  # busy CPUs measured just before the run (other processes)
    during: float = 0.0  # CPUs that processes outside the benchmark used during the run (average)
    corpus: str = ""
    at_peak: list[ProcMem] = field(default_factory=list)  # the tree when its PSS peaked
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds (user + system) per process role


def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, utime + stime ticks)} of every process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _children_map(table: dict[int, tuple[int, int]] | None = None) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in (table if table is not None else _proc_table()).items():
        kids.setdefault(ppid, []).append(pid)
    return kids


def _mem_kb(pid: int) -> tuple[int, int, int]:
    """(RSS, PSS, USS) of one process in KiB, from /proc/PID/smaps_rollup.

    PSS splits each shared page among the processes that map it, so the PSS
    of a process tree counts every page once (the forkserver's pages that its
    workers still share, shared libraries); USS is the private pages alone.
    """
    rss = pss = uss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith((b"Private_Clean:", b"Private_Dirty:")):
                    uss += int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return rss, pss, uss


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _role(pid: int, ppid: int, root: int) -> str:
    """What a process of a tool's tree is: the tool itself, or one of multiprocessing's helpers.

    Parse workers are forked from the forkserver and keep its command line,
    so they are told apart by their parent.
    """
    if ppid == root:
        return "main"
    cmd = _cmdline(pid)
    if b"resource_tracker" in cmd:
        return "resource tracker"
    if b"multiprocessing.forkserver" in cmd:
        return "parse worker" if b"multiprocessing.forkserver" in _cmdline(ppid) else "forkserver"
    return "other"


def _descendants(kids: dict[int, list[int]], root: int) -> list[int]:
    tree, todo = [], list(kids.get(root, ()))
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, ()))
    return tree


class TreeSampler(threading.Thread):
    """While a tool runs: peak summed RSS / PSS of its process tree (the descendants
    of ``pid``, not ``pid`` itself), and the CPU that user-space processes
    outside the benchmark burn meanwhile (``foreign_cpus``: other users of a
    shared machine).

    Inside the benchmark: the tool's tree, the Dovecot tree (``server_pid``)
    and this process. Kernel threads (writeback flushing mbsync's Maildir, ...)
    count as neither. A tool process that exits between two samples loses its
    last < 50 ms to "foreign".
    """

    def __init__(self, pid: int, server_pid: int | None = None, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.server_pid, self.interval = pid, server_pid, interval
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.at_peak: list[ProcMem] = []
        self.cpu_by_role: dict[str, float] = {}
        self._roles: dict[int, str] = {}
        self.max_procs = 0
        self.foreign_cpus = 0.0
        self._first: dict[int, int] = {}
        self._sampled = False
        self._last: dict[int, int] = {}
        self._done = threading.Event()
        self._start = (_cpu_busy(), time.process_time(), time.perf_counter())

    def _sample(self) -> None:
        table = _proc_table()
        kids = _children_map(table)
        tree = _descendants(kids, self.pid)
        mem = [_mem_kb(p) for p in tree]
        self.peak_rss_kb = max(self.peak_rss_kb, sum(m[0] for m in mem))
        for p in tree:
            if p not in self._roles:
                self._roles[p] = _role(p, table[p][0], self.pid)
        pss = sum(m[1] for m in mem)
        if pss > self.peak_pss_kb:
            self.peak_pss_kb = pss
            self.at_peak = [ProcMem(self._roles[p], *m) for p, m in zip(tree, mem, strict=True)]
        self.max_procs = max(self.max_procs, len(tree))
        ours = set(tree)
        if self.server_pid:
            ours.update([self.server_pid, *_descendants(kids, self.server_pid)])
        kernel = {2, *_descendants(kids, 2)}
        for p, (_, ticks) in table.items():
            if p in ours or p in kernel:
                # Processes alive at the first sample count from there; later ones from 0.
                self._first.setdefault(p, 0 if self._sampled else ticks)
                self._last[p] = max(ticks, self._last.get(p, 0))
        self._sampled = True

    def run(self) -> None:
        while not self._done.is_set():
            self._sample()
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()
        self._sample()
        (b0, t0), cpu0, w0 = self._start
        b1, t1 = _cpu_busy()
        tick = os.sysconf("SC_CLK_TCK")
        ours = sum(self._last[p] - self._first[p] for p in self._last) / tick + (time.process_time() - cpu0)
        for p, role in self._roles.items():
            if p in self._last:
                self.cpu_by_role[role] = self.cpu_by_role.get(role, 0.0) + (self._last[p] - self._first[p]) / tick
        busy = (b1 - b0) / tick  # user + nice + system ticks (USER_HZ), summed over CPUs
        self.foreign_cpus = max(0.0, busy - ours) / max(1e-3, time.perf_counter() - w0)


def _cpu_busy() -> tuple[int, int]:
    """(user + nice + system, total) ticks: no idle, iowait, irq or steal time."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2], sum(v)


def background_load(window: float = 0.5) -> float:
    """Busy CPUs (0 .. cpu_count) over ``window`` seconds, while we do nothing."""
    b0, t0 = _cpu_busy()
    time.sleep(window)
    b1, t1 = _cpu_busy()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def wait_quiet(max_busy: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until other processes use less than ``max_busy`` CPUs; returns the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        busy = background_load()
        if busy <= max_busy or time.monotonic() > deadline:
            return busy


def run_measured(tool: str, messages: int, argv: list[str], *, stdout=subprocess.DEVNULL, stderr_path: str | None = None,
                 env: dict | None = None) -> Measure:
    """Run ``argv`` under GNU time (its ru_maxrss is the tool's own, not this
    process's: a child forked from a big parent inherits the parent's high-water
    mark), sampling the tree's memory meanwhile."""
    background = wait_quiet(QUIET_CPUS, QUIET_TIMEOUT)
    fd, time_out = tempfile.mkstemp(prefix="bench-time-")
    os.close(fd)
    err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([TIME_BIN, "-f", "%M %e", "-o", time_out, *argv], stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=err, env=env)
        sampler = TreeSampler(proc.pid, SERVER_PID)
        sampler.start()
        proc.wait()
        seconds = time.perf_counter() - t0
        sampler.stop()
        maxrss_kb = int(Path(time_out).read_text().split()[-2])
    finally:
        os.unlink(time_out)
        if stderr_path:
            err.close()
    if proc.returncode != 0:
        tail = Path(stderr_path).read_text(errors="replace")[-3000:] if stderr_path else ""
        raise RuntimeError(f"{tool} exited with {proc.returncode}: {shlex.join(argv)}\n{tail}")
    return Measure(tool, messages, seconds, maxrss_kb / 1024, sampler.peak_rss_kb / 1024, sampler.peak_pss_kb / 1024,
                   note=f"{sampler.max_procs} procs", background=background, during=sampler.foreign_cpus,
                   at_peak=sampler.at_peak, cpu_by_role=sampler.cpu_by_role)


# --------------------------------------------------------------------------- the tools


def fill_mailbox(server, user, corpus: Corpus, start: int, count: int, seed: int, chunk_bytes: int = 4 << 20) -> tuple[int, float]:
    """MULTIAPPEND messages ``start`` .. ``start + count - 1`` of ``corpus`` to INBOX; returns (total bytes, seconds)."""
    t0 = time.perf_counter()
    total = 0
    client = server.client(user.name, timeout=120)
    try:
        batch: list[bytes] = []
        for i in range(start, start + count):
            batch.append(corpus(i, seed))
            if sum(map(len, batch)) >= chunk_bytes or len(batch) >= 250 or i == start + count - 1:
                total += sum(map(len, batch))
                client.multiappend("INBOX", batch)
                batch = []
        have = client.folder_status("INBOX", ["MESSAGES"])[b"MESSAGES"]
    finally:
        client.logout()
    if have != start + count:
        raise RuntimeError(f"INBOX holds {have} messages, expected {start + count}")
    return total, time.perf_counter() - t0


def mbsync_cmd(work: Path, server, user, tag: str, fsync: bool) -> tuple[list[str], Path]:
    maildir = work / f"maildir-{tag}"
    if maildir.exists():
        shutil.rmtree(maildir)
    maildir.mkdir(parents=True)
    rc = work / f"mbsyncrc-{tag}"
    rc.write_text(
        f"""\
{'' if fsync else 'FSync no'}

IMAPAccount bench
Host {server.host}
Port {server.port}
User {user.name}
Pass {user.password}
SSLType None
AuthMechs LOGIN
PipelineDepth 50

IMAPStore remote
Account bench

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel bench
Far :remote:
Near :local:
Patterns INBOX
Sync Pull
Create Near
Expunge None
SyncState *
"""
    )
    return [MBSYNC, "-q", "-c", str(rc), "bench"], maildir


def count_maildir(maildir: Path) -> int:
    inbox = maildir / "INBOX"
    return sum(len(os.listdir(inbox / d)) for d in ("cur", "new") if (inbox / d).is_dir())


def fetch_loop_main(args: argparse.Namespace) -> int:
    """Hidden mode (a fresh process): the bare imapclient UID FETCH loop."""
    from imapclient import IMAPClient

    client = IMAPClient(args.host, port=args.port, ssl=False, timeout=120)
    if args.imaplib_debug_off:
        # imapclient sets imaplib's debug level to 5, and imaplib then formats every
        # response (message bodies included) for a debug log nobody reads.
        client._imap.debug = 0
    client.login(args.user, args.password)
    client.select_folder("INBOX", readonly=True)
    uids = sorted(client.search(["ALL"]))
    n = nbytes = 0
    for i in range(0, len(uids), args.batch_size):
        chunk = uids[i : i + args.batch_size]
        resp = client.fetch(chunk, ["BODY.PEEK[]"])
        for data in resp.values():
            nbytes += len(data[b"BODY[]"])
            n += 1
        del resp
    client.logout()
    print(json.dumps({"messages": n, "bytes": nbytes}))
    return 0


def commsync_config(work: Path, server, user, batch_size: int | None, workers: int | None, tag: str = "") -> Path:
    box = server.mailbox(user, name="bench", addresses=[OWN_ADDRESS], folders=["INBOX"])
    if batch_size:
        box["batch_size"] = batch_size
    cfg: dict = {"mongodb": {"uri": "memory://"}, "internal_domains": [OWN_DOMAIN], "mailboxes": [box]}
    if workers:
        cfg["daemon"] = {"parse_workers": workers}
    path = work / f"commsync{tag}.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def check_dry_run(commsync: str, cfg: Path, work: Path, expected: int) -> tuple[int, Measure]:
    out_path = work / "dry-run.jsonl"
    with open(out_path, "wb") as out:
        m = run_measured("commsync (check run)", expected, [commsync, "run", "--once", "--dry-run", "-c", str(cfg)],
                         stdout=out, stderr_path=str(work / "commsync-check.stderr"))
    lines = 0
    ids = set()
    with open(out_path, "rb") as f:
        for line in f:
            rec = json.loads(line)
            lines += 1
            ids.add(rec["sources"][0]["uid"])
    out_path.unlink()
    if lines != expected or len(ids) != expected:
        raise RuntimeError(f"commsync dry run printed {lines} JSON lines ({len(ids)} distinct UIDs), expected {expected}")
    return lines, m


# --------------------------------------------------------------------------- parse alone


def parse_costs(corpus: Corpus, seed: int, sample: int) -> list[tuple[str, float]]:
    """Single-core cost of parsing alone, messages/s, on the corpus's first ``sample`` messages."""
    from commsync.connectors.mail import normalize_email

    msgs = [corpus(i, seed) for i in range(sample)]
    compat, default = BytesParser(policy=policy.compat32), BytesParser(policy=policy.default)
    own, domains = frozenset({OWN_ADDRESS}), frozenset({OWN_DOMAIN})

    def default_full(raw: bytes) -> None:
        m = default.parsebytes(raw)
        for k in ("from", "to", "subject", "date", "message-id"):
            m.get(k)
        b = m.get_body(("plain", "html"))
        if b is not None:
            b.get_content()

    cases = [
        ("email compat32 parsebytes", compat.parsebytes),
        ("email policy.default parse + headers + get_body", default_full),
        ("commsync normalize_email", lambda raw: normalize_email(raw, own_addresses=own, internal_domains=domains)),
    ]
    out = []
    for name, fn in cases:
        fn(msgs[0])  # imports, caches
        t0 = time.perf_counter()
        for raw in msgs:
            fn(raw)
        out.append((name, len(msgs) / (time.perf_counter() - t0)))
    return out


# --------------------------------------------------------------------------- main


def source_hashes() -> dict[str, str]:
    """sha256 of each product source file, to tie a result to a code version."""
    return {
        str(path.relative_to(REPO)): hashlib.sha256(path.read_bytes()).hexdigest()
        for pkg in ("config", "connectors", "daemon")
        for path in sorted((REPO / pkg).rglob("*.py"))
    }


def fingerprint(hashes: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:12]


COMMSYNC_TOOL = "commsync run --once --dry-run"
MBSYNC_DEFAULT = "mbsync (defaults)"
MBSYNC_NOFSYNC = "mbsync (FSync no)"
FETCH_TOOL = "bare imapclient UID FETCH loop"
FETCH_TOOL_NODEBUG = "bare imapclient UID FETCH loop, imaplib debug off"


def _groups(results: list[Measure]) -> dict[tuple[str, int, str], list[Measure]]:
    groups: dict[tuple[str, int, str], list[Measure]] = {}
    for m in results:
        groups.setdefault((m.corpus, m.messages, m.tool), []).append(m)
    return groups


def _median_rate(ms: list[Measure] | None, pick: Callable = statistics.median) -> float | None:
    return ms[0].messages / pick(m.seconds for m in ms) if ms else None


def _fmt_summary(results: list[Measure], sizes: dict[str, float], pick: Callable = statistics.median) -> list[str]:
    """The README table: messages/s per tool and corpus, commsync / mbsync, commsync's memory.

    ``pick`` chooses the time of a group's runs: the median, or the best (min) on a machine
    that other work disturbs (interference only ever adds time)."""
    groups = _groups(results)
    lines = [
        "| corpus (avg size) | messages | commsync dry run | mbsync, defaults | mbsync, `FSync no` | bare fetch loop (imaplib debug off) "
        "| commsync / mbsync defaults | commsync peak PSS, process tree | commsync peak RSS, largest process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(c, n) for c, n, _ in groups}, key=lambda k: (list(sizes).index(k[0]) if k[0] in sizes else 99, k[1]))

    def rate(r: float | None) -> str:
        return f"{r:,.0f}/s" if r else "failed"

    for corpus, n in keys:
        ours = groups.get((corpus, n, COMMSYNC_TOOL))
        rates = {t: _median_rate(groups.get((corpus, n, t)), pick)
                 for t in (COMMSYNC_TOOL, MBSYNC_DEFAULT, MBSYNC_NOFSYNC, FETCH_TOOL, FETCH_TOOL_NODEBUG)}
        ratio = f"{rates[COMMSYNC_TOOL] / rates[MBSYNC_DEFAULT]:.2f}x" if rates[COMMSYNC_TOOL] and rates[MBSYNC_DEFAULT] else "-"
        pss = f"{max(m.tree_pss_mb for m in ours):.0f} MB" if ours else "-"
        rss = f"{max(m.maxrss_mb for m in ours):.0f} MB" if ours else "-"
        lines.append(
            f"| {corpus} ({sizes.get(corpus, 0):.1f} KiB) | {n:,} | **{rate(rates[COMMSYNC_TOOL])}** | {rate(rates[MBSYNC_DEFAULT])} "
            f"| {rate(rates[MBSYNC_NOFSYNC])} | {rate(rates[FETCH_TOOL])} ({rate(rates[FETCH_TOOL_NODEBUG])}) | **{ratio}** | {pss} | {rss} |"
        )
    return lines


def _fmt_table(results: list[Measure]) -> list[str]:
    lines = [
        "| corpus | tool | messages | median s | messages/s | best s | peak RSS MB (largest process) "
        "| peak RSS MB (process tree) | peak PSS MB (process tree) | all runs, s | other load during runs, CPUs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for (corpus, n, tool), ms in _groups(results).items():
        sec = statistics.median(m.seconds for m in ms)
        lines.append(
            f"| {corpus} | {tool} | {n:,} | {sec:.2f} | {n / sec:,.0f} | {min(m.seconds for m in ms):.2f} | "
            f"{max(m.maxrss_mb for m in ms):.0f} | {max(m.tree_mb for m in ms):.0f} | {max(m.tree_pss_mb for m in ms):.0f} | "
            f"{', '.join(f'{m.seconds:.2f}' for m in ms)} | {', '.join(f'{m.during:.2f}' for m in ms)} |"
        )
    return lines


def _fmt_cpu(results: list[Measure]) -> list[str]:
    """commsync's CPU seconds per process role (the median-time run of each group) against its wall time."""
    roles = ["main", "parse worker", "forkserver", "resource tracker"]
    lines = ["| corpus | messages | wall s | CPU s: " + " | ".join(roles) + " | CPUs busy (all roles / wall) |",
             "|---|---:|---:|" + "---:|" * len(roles) + "---:|"]
    for (corpus, n, tool), ms in _groups(results).items():
        if tool != COMMSYNC_TOOL:
            continue
        mid = sorted(ms, key=lambda m: m.seconds)[len(ms) // 2]
        cpu = mid.cpu_by_role
        lines.append(f"| {corpus} | {n:,} | {mid.seconds:.2f} | " + " | ".join(f"{cpu.get(r, 0):.2f}" for r in roles)
                     + f" | {sum(cpu.values()) / mid.seconds:.2f} |")
    return lines


def _fmt_memory(results: list[Measure]) -> list[str]:
    """commsync's tree at its PSS peak, per role (the run with the highest peak of each group)."""
    lines = [
        "| corpus | messages | process tree PSS | main PSS (RSS) | forkserver PSS (RSS) | parse workers: n x PSS (RSS, private) "
        "| resource tracker PSS (RSS) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (corpus, n, tool), ms in _groups(results).items():
        if tool != COMMSYNC_TOOL:
            continue
        top = max(ms, key=lambda m: m.tree_pss_mb)

        def cell(role: str, procs: list[ProcMem] = top.at_peak) -> str:
            these = [p for p in procs if p.role == role]
            if not these:
                return "-"
            if role == "parse worker":
                k = len(these)
                return (f"{k} x {sum(p.pss for p in these) / k / 1024:.0f} MB ({sum(p.rss for p in these) / k / 1024:.0f}, "
                        f"{sum(p.uss for p in these) / k / 1024:.0f})")
            return f"{sum(p.pss for p in these) / 1024:.0f} MB ({sum(p.rss for p in these) / 1024:.0f})"

        lines.append(f"| {corpus} | {n:,} | {top.tree_pss_mb:.0f} MB | {cell('main')} | {cell('forkserver')} | "
                     f"{cell('parse worker')} | {cell('resource tracker')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    global QUIET_CPUS, QUIET_TIMEOUT, SERVER_PID
    # Started in the background (`cmd &`) SIGINT is ignored and SIGTERM kills at
    # once; either way stop Dovecot and remove the temporary files first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000, help="messages in the mailbox (default %(default)s)")
    p.add_argument("--corpus", default="business,small",
                   help=f"comma-separated corpora to run, each on its own mailbox ({', '.join(CORPORA)}; default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per tool; the median is reported (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="UIDs per FETCH for commsync and the bare loop (default: commsync's own default, 500)")
    p.add_argument("--parse-workers", type=int, default=None, help="daemon.parse_workers for commsync (default: one per core)")
    p.add_argument("--double-runs", type=int, default=1,
                   help="runs at 2N messages, to show memory does not grow with the mailbox (0 skips; default %(default)s)")
    p.add_argument("--no-parse-cost", action="store_true", help="skip the single-core parse-cost table")
    p.add_argument("--parse-sample", type=int, default=3000, help="messages for the parse-cost table (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-cpus", type=float, default=QUIET_CPUS,
                   help="before each run wait until other processes use at most this many CPUs (default %(default)s)")
    p.add_argument("--quiet-timeout", type=float, default=QUIET_TIMEOUT,
                   help="give up waiting for a quiet machine after this many seconds (default %(default)s)")
    p.add_argument("--commsync", default=DEFAULT_COMMSYNC, help="commsync executable (default %(default)s)")
    p.add_argument("--markdown", help="also write the result (markdown, with the command line) to this file")
    p.add_argument("--keep", action="store_true", help="keep the Dovecot and work directories")
    p.add_argument("--_fetch-loop", dest="fetch_loop", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--imaplib-debug-off", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--user", help=argparse.SUPPRESS)
    p.add_argument("--password", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fetch_loop:
        args.batch_size = args.batch_size or 500
        return fetch_loop_main(args)

    corpora = [c.strip() for c in args.corpus.split(",") if c.strip()]
    unknown = [c for c in corpora if c not in CORPORA]
    if unknown or not corpora:
        p.error(f"unknown corpus {', '.join(unknown) or '(none)'}; choose from {', '.join(CORPORA)}")
    if not os.path.exists(TIME_BIN):
        sys.exit(f"{TIME_BIN} not found (apt-get install time)")
    if not os.path.exists(MBSYNC):
        sys.exit(f"{MBSYNC} not found (apt-get install isync)")
    if not os.path.exists(args.commsync):
        sys.exit(f"{args.commsync} not found (pip install -e . in a venv)")

    from dovecot import DovecotServer

    QUIET_CPUS, QUIET_TIMEOUT = args.quiet_cpus, args.quiet_timeout

    n = args.messages
    batch = args.batch_size or 500
    command = shlex.join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd()) else sys.executable,
                          os.path.relpath(__file__, os.getcwd()), *(sys.argv[1:] if argv is None else argv)])
    work = Path(tempfile.mkdtemp(prefix="commsync-bench-"))
    hashes_before = source_hashes()
    results: list[Measure] = []
    notes: list[str] = []
    failures: list[str] = []
    sizes: dict[str, float] = {}
    parse_rows: dict[str, list[tuple[str, float]]] = {}
    loads: list[float] = []

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def attempt(what: str, fn) -> None:
        """Run one measurement; a failure is reported and the benchmark goes on."""
        try:
            fn()
        except Exception as exc:
            first = str(exc).strip().splitlines()
            last = first[-1] if first else type(exc).__name__
            failures.append(f"{what}: {(first[0] if first else '')[:200]} ... {last[:300]}")
            log(f"FAILED {what}: {exc}")

    server = DovecotServer(keep_tmpdir=args.keep)
    server.start()
    SERVER_PID = server._proc.pid if server._proc else None
    try:
        for name in corpora:
            corpus = CORPORA[name]
            user = server.new_user(f"bench{name}")
            nbytes, secs = fill_mailbox(server, user, corpus, 0, n, args.seed)
            sizes[name] = nbytes / n / 1024
            log(f"[{name}] INBOX filled: {n} messages, {nbytes / n / 1024:.1f} KiB average, {nbytes / 2**20:.1f} MiB, in {secs:.1f}s")
            notes.append(f"{CORPUS_DESCRIPTIONS[name]}: {n:,} messages, {nbytes / n / 1024:.1f} KiB average "
                         f"({nbytes / 2**20:.1f} MiB); filled by MULTIAPPEND in {secs:.1f} s")
            cfg = commsync_config(work, server, user, args.batch_size, args.parse_workers, tag=f"-{name}")
            fetch_argv = [sys.executable, __file__, "--_fetch-loop", "--host", server.host, "--port", str(server.port),
                          "--user", user.name, "--password", user.password, "--batch-size", str(batch)]
            commsync_argv = [args.commsync, "run", "--once", "--dry-run", "-c", str(cfg)]

            def record(m: Measure, name: str = name) -> Measure:
                m.corpus = name
                results.append(m)
                loads.append(m.during)
                return m

            def mbsync_once(count: int, tag: str, fsync: bool, user=user, name=name, record=record) -> None:
                tool = MBSYNC_DEFAULT if fsync else MBSYNC_NOFSYNC
                mb_argv, maildir = mbsync_cmd(work, server, user, f"{name}-{tag}-{int(fsync)}", fsync)
                try:
                    m = run_measured(tool, count, mb_argv, stderr_path=str(work / "mbsync.stderr"))
                    got = count_maildir(maildir)
                finally:
                    shutil.rmtree(maildir, ignore_errors=True)
                    os.sync()  # its dirty pages must not be written back during the next tool's run
                if got != count:
                    raise RuntimeError(f"mbsync stored {got} messages, expected {count}")
                record(m)
                log(f"[{name}] {tool}: {count} in {m.seconds:.2f}s ({count / m.seconds:,.0f}/s), RSS {m.maxrss_mb:.0f} MB")

            def fetch_once(count: int, quiet_imaplib: bool = False, fetch_argv=fetch_argv, name=name, record=record) -> None:
                out_path = work / "fetch-loop.json"
                tool = FETCH_TOOL_NODEBUG if quiet_imaplib else FETCH_TOOL
                with open(out_path, "wb") as out:
                    m = run_measured(tool, count, fetch_argv + (["--imaplib-debug-off"] if quiet_imaplib else []), stdout=out,
                                     stderr_path=str(work / "fetch.stderr"))
                got = json.loads(out_path.read_text())["messages"]
                if got != count:
                    raise RuntimeError(f"fetch loop saw {got} messages, expected {count}")
                m.note = f"chunks of {batch}"
                record(m)
                log(f"[{name}] {tool}: {count} in {m.seconds:.2f}s ({count / m.seconds:,.0f}/s), RSS {m.maxrss_mb:.0f} MB")

            def commsync_once(count: int, commsync_argv=commsync_argv, name=name, record=record) -> None:
                m = record(run_measured(COMMSYNC_TOOL, count, commsync_argv, stderr_path=str(work / "commsync.stderr")))
                log(f"[{name}] commsync: {count} in {m.seconds:.2f}s ({count / m.seconds:,.0f}/s), "
                    f"RSS {m.maxrss_mb:.0f} MB max process, {m.tree_mb:.0f} MB tree, PSS {m.tree_pss_mb:.0f} MB tree ({m.note}); "
                    f"other load before/during {m.background:.2f}/{m.during:.2f} CPUs")

            def check(count: int, cfg=cfg, name=name) -> None:
                lines, m = check_dry_run(args.commsync, cfg, work, count)
                log(f"[{name}] commsync dry run printed {lines} JSON lines (expected {count}) in {m.seconds:.1f}s")
                notes.append(f"check ({name}): `commsync run --once --dry-run` printed {lines:,} JSON lines for {count:,} "
                             "messages (one per message, distinct UIDs)")

            def one_round(count: int, tag: str, name=name, mbsync_once=mbsync_once, fetch_once=fetch_once,
                          commsync_once=commsync_once) -> None:
                for fsync in (False, True):
                    attempt(f"{name}: mbsync at {count}", lambda fsync=fsync: mbsync_once(count, tag, fsync))
                attempt(f"{name}: fetch loop at {count}", lambda: fetch_once(count))
                attempt(f"{name}: fetch loop (imaplib debug off) at {count}", lambda: fetch_once(count, True))
                attempt(f"{name}: commsync at {count}", lambda: commsync_once(count))

            # Warm-up (Dovecot's indexes and caches) and correctness: one dry run into a file.
            attempt(f"{name}: commsync check run at {n}", lambda check=check: check(n))
            for r in range(args.runs):
                log(f"[{name}] run {r + 1}/{args.runs} at {n} messages")
                one_round(n, f"r{r}")

            if args.double_runs:
                nbytes2, secs = fill_mailbox(server, user, corpus, n, n, args.seed)
                os.sync()
                log(f"[{name}] INBOX now {2 * n} messages (+{nbytes2 / 2**20:.1f} MiB in {secs:.1f}s)")
                attempt(f"{name}: commsync check run at {2 * n}", lambda check=check: check(2 * n))
                for r in range(args.double_runs):
                    log(f"[{name}] run {r + 1}/{args.double_runs} at {2 * n} messages")
                    one_round(2 * n, f"d{r}")

            if not args.no_parse_cost:
                attempt(f"{name}: parse-cost table",
                        lambda corpus=corpus, name=name: parse_rows.__setitem__(name, parse_costs(corpus, args.seed, args.parse_sample)))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} and {server.tmpdir}", file=sys.stderr)

    out = [f"Command: `{command}`", "",
           f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
           f"{subprocess.run([MBSYNC, '--version'], capture_output=True, text=True).stdout.strip()}, "
           f"Dovecot {_dovecot_version()} on loopback, plain IMAP.", ""]
    out += _fmt_summary(results, sizes)
    if len({m.seconds for m in results}) > 1 and args.runs > 1:
        out += ["", f"The same with the best of the {args.runs} runs instead of the median (a shared machine only adds time):", ""]
        out += _fmt_summary(results, sizes, min)
    out += ["", "Every run:", ""] + _fmt_table(results)
    out += ["", "commsync's memory at the peak of its process tree's PSS (the run with the highest peak), per process:", ""]
    out += _fmt_memory(results)
    out += ["", "commsync's CPU per process role (user + system, the median run), against its wall time:", ""]
    out += _fmt_cpu(results)
    out += [""] + [f"- FAILED {f}" for f in failures] + [f"- {note}" for note in notes]
    if results:
        loud = [m for m in results if m.background > QUIET_CPUS]
        busy = [m for m in results if m.during > 0.25]
        out.append(
            f"- other load: each run waited for a quiet machine (other processes <= {QUIET_CPUS} CPUs, at most "
            f"{QUIET_TIMEOUT:.0f} s){f'; {len(loud)} of {len(results)} runs started without it' if loud else ''}. "
            "'other load during runs' is the average CPU that user-space processes outside the benchmark (not "
            "the tool, not Dovecot, not this script, not kernel threads) used while the tool ran"
            + (f"; {len(busy)} of {len(results)} runs shared the machine with > 0.25 CPUs of other work: their times "
               "are pessimistic" if busy else "; no run shared the machine with more than 0.25 CPUs of other work")
            + f" (median {statistics.median(loads):.2f}, max {max(loads):.2f} CPUs)."
        )
    hashes_after = source_hashes()
    changed = sorted(k for k in hashes_before.keys() | hashes_after.keys() if hashes_before.get(k) != hashes_after.get(k))
    out.append(f"- product source (config/, connectors/, daemon/ *.py) fingerprint {fingerprint(hashes_before)}"
               + (f" at the start, {fingerprint(hashes_after)} at the end: changed during the run: {', '.join(changed)}"
                  if changed else " (unchanged during the run)"))
    out += [
        "- messages/s = messages / median wall seconds; every tool is a fresh process (connect + login included).",
        "- peak RSS (largest process): GNU time's %M, ru_maxrss of the tool and the descendants it reaped (the "
        "largest single one). Process tree: peak, sampled every 50 ms, of the RSS (shared pages counted in every "
        "process) and PSS (shared pages split, so counted once: the sum over the tree is what it costs the machine) "
        "summed over the tool and all its descendants, i.e. including commsync's forkserver, parse-pool workers "
        "and multiprocessing's resource tracker.",
        "- mbsync pulls INBOX into a fresh Maildir on local disk; `FSync no` is the stricter baseline "
        "(commsync's dry run writes to /dev/null). The bare fetch loop (imapclient, `UID FETCH BODY.PEEK[]` in "
        f"chunks of {batch}, nothing parsed or stored) is the limit for a Python IMAP client; in parentheses the "
        "same with imaplib's debug level set back to 0 (imapclient sets it to 5, and imaplib then formats every "
        "response, message bodies included, for a debug log).",
    ]
    for name, rows in parse_rows.items():
        out += ["", f"Parsing alone, one core, the {name} corpus's first {args.parse_sample:,} messages (in the bench process):", "",
                "| parse | messages/s (one core) | ms/message |", "|---|---:|---:|"]
        out += [f"| {case} | {rate:,.0f} | {1000 / rate:.2f} |" for case, rate in rows]
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 1 if failures else 0


def _dovecot_version() -> str:
    try:
        return subprocess.run(["/usr/sbin/dovecot", "--version"], capture_output=True, text=True).stdout.split()[0]
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
