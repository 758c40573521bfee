#!/usr/bin/env python3
"""Where commsync's mail capture spends its time and memory (run by hand, never collected).

    .venv/bin/python tests/bench_profile.py parse  [--corpus business] [--messages 3000]
    .venv/bin/python tests/bench_profile.py daemon [--corpus business] [--messages 10000]
    .venv/bin/python tests/bench_profile.py fetch  [--corpus business] [--messages 10000]
    .venv/bin/python tests/bench_profile.py whatif [--corpus business] [--messages 10000] [--runs 3]
    .venv/bin/python tests/bench_profile.py memory [--corpus business]

``parse``: ``normalize_email`` over the corpus in this one process, under
cProfile (top functions by cumulative and by own time), its cost per kind of
message, and what the process around the parse pays per message: pickling
the raw mail to a worker and the record back, and the dry-run sink's JSON.

``daemon``: fills a mailbox on the test Dovecot, times one
``commsync run --once --dry-run`` with the CPU seconds of each process role,
then runs it under ``py-spy record --subprocesses --threads`` (py-spy must be
in the venv: ``.venv/bin/pip install py-spy``) twice: every thread py-spy
finds not idle (running, or runnable and waiting for a CPU: on 2 cores with
2 parse workers the main process waits a lot), then only the thread holding
the GIL (``--gil``: the Python CPU of each process); the samples are
aggregated per process role and thread (own and cumulative per function).
Last it runs the same command in this process with timers around the
connector's FETCH, the parse pool and the sink, to show what the event loop
waits for.

``fetch``: the IMAP read alone in this process (what the connector's thread
does): messages/s by FETCH chunk size, with the garbage collector on and
off, and a cProfile of one pass.

``whatif``: candidate changes measured on the real CLI without changing it:
a stand-in for the console script applies a patch in the main process
(imaplib's debug level back to 0; a ``__main__`` module that the parse workers
do not re-import) and/or sets ``parse_workers: 1``; wall time, CPU per
process role and memory, median of ``--runs``.

``memory``: what each process of the parse pool costs: fresh interpreters
importing what the main process and the workers import, and real forkserver
workers before and after parsing a batch (RSS, PSS, private).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pickle
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent
VENV_BIN = REPO / ".venv" / "bin"

from bench_corpus import CORPORA, OWN_ADDRESS, OWN_DOMAIN, business_sample  # noqa: E402

OWN = frozenset({OWN_ADDRESS})
DOMAINS = frozenset({OWN_DOMAIN})


def _samples(corpus: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """(kind, raw) of the corpus's first ``n`` messages."""
    if corpus == "business":
        return [(s.kind, s.raw) for s in (business_sample(i, seed) for i in range(n))]
    return [(corpus, CORPORA[corpus](i, seed)) for i in range(n)]


def _fmt_stats(stats: pstats.Stats, key: str, top: int, total: float) -> list[str]:
    stats.sort_stats(key)
    lines = ["| # | function | calls | own s | cumulative s | cumulative % |", "|---:|---|---:|---:|---:|---:|"]
    for i, func in enumerate(stats.fcn_list[:top], 1):  # type: ignore[attr-defined]
        cc, nc, tt, ct, _ = stats.stats[func]  # type: ignore[attr-defined]
        file, line, name = func
        where = f"{_short(file)}:{line}({name})" if line else name
        lines.append(f"| {i} | `{where}` | {nc:,} | {tt:.3f} | {ct:.3f} | {100 * ct / total:.0f}% |")
    return lines


def _short(path: str) -> str:
    for marker in (str(REPO) + "/", "site-packages/", "/lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


# --------------------------------------------------------------------------- parse


def cmd_parse(args: argparse.Namespace) -> None:
    from commsync.connectors.mail import normalize_email
    from commsync.connectors.mailpool import MailOptions, RawMail
    from commsync.daemon.text import json_default

    samples = _samples(args.corpus, args.messages, args.seed)
    total_bytes = sum(len(raw) for _, raw in samples)
    normalize_email(samples[0][1], own_addresses=OWN, internal_domains=DOMAINS)  # imports (inscriptis, lxml)

    # Per kind, without the profiler's overhead.
    per_kind: dict[str, list[float]] = defaultdict(list)
    size_kind: dict[str, list[int]] = defaultdict(list)
    records = []
    t_all = time.perf_counter()
    for kind, raw in samples:
        t0 = time.perf_counter()
        records.append(normalize_email(raw, own_addresses=OWN, internal_domains=DOMAINS))
        per_kind[kind].append(time.perf_counter() - t0)
        size_kind[kind].append(len(raw))
    plain_secs = time.perf_counter() - t_all

    prof = cProfile.Profile()
    prof.enable()
    for _, raw in samples:
        normalize_email(raw, own_addresses=OWN, internal_domains=DOMAINS)
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]

    # What the main process pays around the pool, per message: pickling RawMail
    # batches to the workers, unpickling the records, and the dry run's JSON.
    options = MailOptions(OWN, DOMAINS, 100_000)
    items = [RawMail(raw, None, False, {"kind": "imap", "uid": i}) for i, (_, raw) in enumerate(samples)]
    t0 = time.perf_counter()
    out = [pickle.dumps((items[i : i + 250], options), pickle.HIGHEST_PROTOCOL) for i in range(0, len(items), 250)]
    pickle_out = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = [pickle.dumps([(r, None) for r in records[i : i + 250]], pickle.HIGHEST_PROTOCOL) for i in range(0, len(records), 250)]
    pickle_back = time.perf_counter() - t0
    t0 = time.perf_counter()
    for blob in back:
        pickle.loads(blob)
    unpickle_back = time.perf_counter() - t0
    t0 = time.perf_counter()
    lines = [json.dumps(r, default=json_default, ensure_ascii=False) for r in records]
    json_secs = time.perf_counter() - t0

    n = len(samples)
    print(f"## normalize_email over the {args.corpus} corpus: {n:,} messages, {total_bytes / n / 1024:.1f} KiB average\n")
    print(f"One core, no profiler: {plain_secs:.2f} s, {n / plain_secs:,.0f} messages/s, "
          f"{plain_secs / n * 1000:.3f} ms/message, {total_bytes / plain_secs / 2**20:.1f} MiB/s.\n")
    print("Per kind (no profiler):\n")
    print("| kind | share | avg KiB | ms/message | share of parse time |")
    print("|---|---:|---:|---:|---:|")
    for kind, secs in sorted(per_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {kind} | {len(secs) / n:.1%} | {statistics.mean(size_kind[kind]) / 1024:.1f} | "
              f"{statistics.mean(secs) * 1000:.3f} | {sum(secs) / plain_secs:.0%} |")
    print(f"\nUnder cProfile: {total:.2f} s. Top {args.top} by cumulative time:\n")
    print("\n".join(_fmt_stats(stats, "cumulative", args.top, total)))
    print(f"\nTop {args.top} by own time:\n")
    print("\n".join(_fmt_stats(stats, "tottime", args.top, total)))
    print("\nAround the pool, in the main process (per message):\n")
    print("| step | µs/message | note |")
    print("|---|---:|---|")
    print(f"| pickle RawMail batches of 250 to the workers | {pickle_out / n * 1e6:.0f} | "
          f"{sum(map(len, out)) / n / 1024:.1f} KiB/message through the pipe |")
    print(f"| unpickle the records coming back | {unpickle_back / n * 1e6:.0f} | "
          f"{sum(map(len, back)) / n / 1024:.1f} KiB/message (workers pickle them: {pickle_back / n * 1e6:.0f} µs) |")
    print(f"| dry-run sink: json.dumps per record | {json_secs / n * 1e6:.0f} | "
          f"{sum(map(len, lines)) / n / 1024:.1f} KiB of JSON/message |")
    print(f"| normalize_email (for scale) | {plain_secs / n * 1e6:.0f} | split over the workers |")


# --------------------------------------------------------------------------- daemon

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> str:
    m = _FRAME.match(frame)
    return f"{m['func']} ({_short(m['file'])})" if m else frame


def _classify(stack: list[str]) -> tuple[str, str, list[str]]:
    """(process role, thread role, Python frames) of one py-spy raw stack."""
    procs = [f for f in stack if f.startswith("process ")]
    frames = [f for f in stack if not f.startswith(("process ", "thread "))]
    forky = sum("multiprocessing.forkserver" in p for p in procs)
    if any("resource_tracker" in p for p in procs):
        role = "resource tracker"
    elif forky >= 2:
        role = "parse worker"
    elif forky == 1:
        role = "forkserver"
    else:
        role = "main"
    text = ";".join(frames)
    if role != "main":
        thread = "-"
    elif "_run_once (asyncio/base_events.py" in text:
        thread = "event loop"
    elif "imapclient" in text or "ImapConnector" in text:
        thread = "IMAP thread"
    elif "_queue_management_worker" in text or "concurrent/futures/process.py" in text:
        thread = "pool manager thread"
    elif "<module>" in text and "asyncio" not in text:
        thread = "start-up (imports)"
    else:
        thread = "other thread"
    return role, thread, frames


def aggregate_pyspy(path: Path, rate: int) -> dict[tuple[str, str], tuple[Counter, Counter, int]]:
    """{(process role, thread): (own samples per function, cumulative samples per function, samples)}."""
    out: dict[tuple[str, str], tuple[Counter, Counter, int]] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        role, thread, frames = _classify(stack_text.split(";"))
        own, cum, total = out.get((role, thread), (Counter(), Counter(), 0))
        if frames:
            own[_frame_key(frames[-1])] += count
            for key in {_frame_key(f) for f in frames}:
                cum[key] += count
        out[(role, thread)] = (own, cum, total + count)
    return out


def _top(counter: Counter, total: int, rate: int, k: int) -> list[str]:
    lines = ["| # | function | sampled s | % of this group's samples |", "|---:|---|---:|---:|"]
    for i, (func, c) in enumerate(counter.most_common(k), 1):
        lines.append(f"| {i} | `{func}` | {c / rate:.2f} | {100 * c / total:.0f}% |")
    return lines


def _fill(n: int, corpus: str, seed: int):
    from bench_imap import commsync_config, fill_mailbox
    from dovecot import DovecotServer

    server = DovecotServer()
    server.start()
    user = server.new_user(f"prof{corpus}")
    nbytes, secs = fill_mailbox(server, user, CORPORA[corpus], 0, n, seed)
    work = Path(tempfile.mkdtemp(prefix="commsync-prof-"))
    cfg = commsync_config(work, server, user, None, None)
    print(f"mailbox: {n:,} {corpus} messages, {nbytes / n / 1024:.1f} KiB average, filled in {secs:.1f} s\n", file=sys.stderr)
    return server, work, cfg, user


def cmd_daemon(args: argparse.Namespace) -> None:
    pyspy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    commsync = str(VENV_BIN / "commsync")
    server, work, cfg, _ = _fill(args.messages, args.corpus, args.seed)
    try:
        argv = [commsync, "run", "--once", "--dry-run", "-c", str(cfg)]
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # warm Dovecot's caches
        print(f"## `commsync run --once --dry-run`, {args.messages:,} {args.corpus} messages\n")
        import bench_imap

        m = bench_imap.run_measured("commsync", args.messages, argv)
        print(f"Without a profiler: {m.seconds:.2f} s wall; CPU seconds per process role (user + system): "
              + ", ".join(f"{role} {secs:.2f}" for role, secs in sorted(m.cpu_by_role.items(), key=lambda kv: -kv[1]))
              + f"; other load during the run {m.during:.2f} CPUs\n")
        for mode, extra in (("runnable (on CPU or waiting for one)", []), ("holding the GIL", ["--gil"])):
            if not pyspy:
                print("(py-spy not found: .venv/bin/pip install py-spy)\n")
                break
            raw = work / "pyspy.txt"
            t0 = time.perf_counter()
            subprocess.run([pyspy, "record", "--subprocesses", "--threads", "--nonblocking", "--format", "raw",
                            "--rate", str(args.rate), "-o", str(raw), *extra, "--", *argv],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            wall = time.perf_counter() - t0
            groups = aggregate_pyspy(raw, args.rate)
            print(f"### py-spy, threads {mode} (--subprocesses --threads {' '.join(extra)}, {args.rate} Hz; "
                  f"{wall:.1f} s under py-spy)\n")
            print("| process | thread | sampled s |")
            print("|---|---|---:|")
            for (role, thread), (_, _, total) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
                print(f"| {role} | {thread} | {total / args.rate:.2f} |")
            main_own, main_cum, main_total = Counter(), Counter(), 0
            for (role, _), (own, cum, total) in groups.items():
                if role == "main":
                    main_own.update(own)
                    main_cum.update(cum)
                    main_total += total
            print(f"\n### main process, all threads ({main_total / args.rate:.2f} CPU s): top {args.top} by cumulative\n")
            print("\n".join(_top(main_cum, main_total, args.rate, args.top)))
            print(f"\n### main process, all threads: top {args.top} by own time\n")
            print("\n".join(_top(main_own, main_total, args.rate, args.top)))
            for thread in ("event loop", "IMAP thread"):
                own, cum, total = groups.get(("main", thread), (Counter(), Counter(), 0))
                if total:
                    print(f"\n### main process, {thread} ({total / args.rate:.2f} CPU s): top {args.top} by own time\n")
                    print("\n".join(_top(own, total, args.rate, args.top)))
            w_own, w_cum, w_total = Counter(), Counter(), 0
            for (role, _), (own, cum, total) in groups.items():
                if role == "parse worker":
                    w_own.update(own)
                    w_cum.update(cum)
                    w_total += total
            if w_total:
                print(f"\n### parse workers together ({w_total / args.rate:.2f} CPU s): top {args.top} by own time\n")
                print("\n".join(_top(w_own, w_total, args.rate, args.top)))
            if args.keep_raw:
                shutil.copy(raw, f"{args.keep_raw}.{'gil' if extra else 'runnable'}")
        phases(cfg, args.messages)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def phases(cfg: Path, expected: int) -> None:
    """The dry run in this process, with timers around FETCH, the parse pool and the sink."""
    import imapclient

    from commsync.connectors import imap as imap_mod
    from commsync.connectors import mailpool
    from commsync.daemon import cli, runner, sinks

    spans: dict[str, list[float]] = defaultdict(list)
    waits: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, label: str, is_async: bool):
        original = getattr(owner, name)
        if is_async:
            async def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return await original(*a, **kw)
                finally:
                    spans[label].append(time.perf_counter() - t0)
        else:
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    spans[label].append(time.perf_counter() - t0)
        setattr(owner, name, wrapper)
        return original

    originals = [
        (imapclient.IMAPClient, "fetch", timed(imapclient.IMAPClient, "fetch", "IMAP thread: IMAPClient.fetch (blocking)", False)),
        (imap_mod.ImapConnector, "_fetch", timed(imap_mod.ImapConnector, "_fetch", "event loop: ImapConnector._fetch (await)", True)),
        (mailpool.MailParser, "parse", timed(mailpool.MailParser, "parse", "event loop: MailParser.parse (await the pool)", True)),
        (sinks.DryRunSink, "write", timed(sinks.DryRunSink, "write", "event loop: DryRunSink.write (JSON + stdout)", True)),
        (imap_mod.ImapConnector, "_normalize",
         timed(imap_mod.ImapConnector, "_normalize", "event loop: ImapConnector._normalize (parse + checks)", True)),
    ]
    # The loop's wait for the next batch (fetch not done yet) is what pipelining leaves.
    original_next = runner.Runner._next

    async def next_timed(self, batches, worker):
        t0 = time.perf_counter()
        try:
            return await original_next(self, batches, worker)
        finally:
            waits["runner: await next batch (fetch + parse of it)"] += time.perf_counter() - t0

    runner.Runner._next = next_timed
    stdout = sys.stdout
    t0 = time.perf_counter()
    try:
        with open(os.devnull, "w") as null:
            sys.stdout = null
            code = cli.main(["run", "--once", "--dry-run", "-c", str(cfg)])
    finally:
        sys.stdout = stdout
        runner.Runner._next = original_next
        for owner, name, fn in originals:
            setattr(owner, name, fn)
    wall = time.perf_counter() - t0
    print(f"\n### phases of the dry run (in this process, exit {code}): {wall:.2f} s wall, {expected:,} messages\n")
    print("Spans overlap: the next chunk's FETCH runs while this one is parsed.\n")
    print("| span | count | total s | mean ms | % of wall |")
    print("|---|---:|---:|---:|---:|")
    for label, xs in spans.items():
        print(f"| {label} | {len(xs)} | {sum(xs):.2f} | {statistics.mean(xs) * 1000:.1f} | {100 * sum(xs) / wall:.0f}% |")
    for label, secs in waits.items():
        print(f"| {label} | - | {secs:.2f} | - | {100 * secs / wall:.0f}% |")


# --------------------------------------------------------------------------- what if

# A stand-in for the `commsync` console script (same module-level import, so the
# parse workers re-import it the same way), with optional patches applied in the
# main process only. The product code is not changed: these are measurements of
# candidate changes.
_WRAPPER = """\
import sys
from commsync.daemon.cli import main  # the console script's import

if __name__ == "__main__":
    patches = sys.argv.pop(1).split(",")
    if "imaplib-debug-off" in patches:
        import imapclient

        _init = imapclient.IMAPClient.__init__

        def _quiet_init(self, *args, **kwargs):
            _init(self, *args, **kwargs)
            self._imap.debug = 0  # imapclient sets 5: imaplib formats every response for its debug log

        imapclient.IMAPClient.__init__ = _quiet_init
    if "no-main-reimport" in patches:
        import importlib.machinery

        # multiprocessing skips re-running a main module named "__main__" in its children.
        sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec("__main__", None)
    sys.exit(main())
"""

WHAT_IFS = [
    ("as is", "none", None),
    ("imaplib debug off", "imaplib-debug-off", None),
    ("workers do not re-import the CLI", "no-main-reimport", None),
    ("both", "imaplib-debug-off,no-main-reimport", None),
    ("both, parse_workers: 1", "imaplib-debug-off,no-main-reimport", 1),
    ("as is, parse_workers: 1", "none", 1),
]


def cmd_whatif(args: argparse.Namespace) -> None:
    """Candidate changes measured on the real CLI (a fresh process per run), median of ``--runs``."""
    import bench_imap

    bench_imap.QUIET_TIMEOUT = args.quiet_timeout
    server, work, _, user = _fill(args.messages, args.corpus, args.seed)
    try:
        wrapper = work / "commsync_wrapper.py"
        wrapper.write_text(_WRAPPER)
        variants = []
        for label, patches, workers in WHAT_IFS:
            cfg = bench_imap.commsync_config(work, server, user, None, workers, tag=f"-w{workers}")
            argv = [sys.executable, str(wrapper), patches, "run", "--once", "--dry-run", "-c", str(cfg)]
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # warm caches
            variants.append((label, argv, []))
        # Round-robin: every round runs each variant once, so other load hits them alike.
        for _ in range(args.runs):
            for label, argv, runs in variants:
                runs.append(bench_imap.run_measured(label, args.messages, argv))
        rows = []
        for label, _, runs in variants:
            mid = sorted(runs, key=lambda m: m.seconds)[len(runs) // 2]
            rows.append((label, runs, mid))
            print(f"{label}: {[round(m.seconds, 2) for m in runs]}", file=sys.stderr)
        print(f"## candidate changes, measured: `commsync run --once --dry-run`, {args.messages:,} {args.corpus} messages, "
              f"median of {args.runs}\n")
        print("| variant | median s | messages/s | best s | CPU s: main / workers / forkserver | tree PSS peak MB | "
              "largest RSS MB | main / worker PSS at peak MB | other load, CPUs |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, runs, mid in rows:
            cpu = mid.cpu_by_role
            main_pss = sum(p.pss for p in mid.at_peak if p.role == "main") / 1024
            workers = [p.pss for p in mid.at_peak if p.role == "parse worker"]
            worker_pss = f"{sum(workers) / len(workers) / 1024:.0f}" if workers else "-"
            print(f"| {label} | {mid.seconds:.2f} | {args.messages / mid.seconds:,.0f} | {min(m.seconds for m in runs):.2f} | "
                  f"{cpu.get('main', 0):.2f} / "
                  f"{cpu.get('parse worker', 0):.2f} / {cpu.get('forkserver', 0):.2f} | {max(m.tree_pss_mb for m in runs):.0f} | "
                  f"{max(m.maxrss_mb for m in runs):.0f} | {main_pss:.0f} / {worker_pss} | "
                  f"{', '.join(f'{m.during:.2f}' for m in runs)} |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- fetch


def cmd_fetch(args: argparse.Namespace) -> None:
    """The IMAP read alone, in this process: chunk sizes, the garbage collector, and a profile."""
    import gc

    server, work, _, user = _fill(args.messages, args.corpus, args.seed)
    try:
        client = server.client(user.name, timeout=120)
        client.normalise_times = False
        client.select_folder("INBOX", readonly=True)
        uids = sorted(client.search(["ALL"]))
        # What ImapConnector._fetch asks for.
        items = ["BODY.PEEK[]<0.26214400>", "INTERNALDATE", "RFC822.SIZE"]

        def one_pass(chunk: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            nbytes = 0
            for i in range(0, len(uids), chunk):
                resp = client.fetch(uids[i : i + chunk], items)
                nbytes += sum(len(v.get(b"BODY[]<0>") or v.get(b"BODY[]") or b"") for v in resp.values())
                del resp
            return time.perf_counter() - t0, nbytes

        one_pass(500)  # warm Dovecot's caches
        print(f"## IMAP read alone: {len(uids):,} {args.corpus} messages, imapclient in this process\n")
        # imapclient sets imaplib's debug level to 5 (to route its messages to a logger),
        # and imaplib then formats every response, message bodies included, with %r.
        debug = client._imap.debug
        print(f"imapclient leaves imaplib's debug level at {debug}.\n")
        print("| FETCH chunk (UIDs) | imaplib debug | gc | seconds (best of 2) | messages/s | MiB/s |")
        print("|---:|---:|---|---:|---:|---:|")
        for chunk, level, gc_on in ((100, debug, True), (500, debug, True), (2000, debug, True), (500, debug, False),
                                    (100, 0, True), (500, 0, True), (2000, 0, True), (500, 0, False)):
            client._imap.debug = level
            if not gc_on:
                gc.disable()
            try:
                secs, nbytes = min((one_pass(chunk) for _ in range(2)), key=lambda r: r[0])
            finally:
                gc.enable()
                client._imap.debug = debug
            print(f"| {chunk} | {level} | {'on' if gc_on else 'off'} | {secs:.2f} | {len(uids) / secs:,.0f} | "
                  f"{nbytes / secs / 2**20:.1f} |")
        prof = cProfile.Profile()
        prof.enable()
        one_pass(500)
        prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt  # type: ignore[attr-defined]
        print(f"\ncProfile of one pass in chunks of 500 ({total:.2f} s under the profiler), top {args.top} by own time:\n")
        print("\n".join(_fmt_stats(stats, "tottime", args.top, total)))
        client.logout()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- memory


def _rollup(pid: int | str = "self") -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                out[parts[0].rstrip(":")] = int(parts[1])
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0),
            "private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}


_IMPORTS = {
    "bare interpreter": "",
    "commsync.connectors.mailpool (what workers need)": "import commsync.connectors.mailpool",
    "+ the rest of the forkserver's preload (lifeline, inscriptis, charset_normalizer)":
        "import commsync.connectors.lifeline, commsync.connectors.mailpool, inscriptis, charset_normalizer",
    "commsync.daemon.cli (the main process)": "import commsync.daemon.cli",
    "commsync.daemon.cli + store driver (motor, mongomock)": "import commsync.daemon.cli, motor.motor_asyncio, mongomock_motor",
}


def _worker_probe(items, options) -> dict:
    """In a pool worker: its memory before and after parsing ``items``, and its module count."""
    from commsync.connectors.mailpool import normalize_many

    before = _rollup()
    normalize_many(items, options)
    after = _rollup()
    return {"pid": os.getpid(), "before": before, "after": after, "modules": len(sys.modules)}


def probe_pool(corpus: str, messages: int, seed: int, workers: int) -> dict:
    """Start a forkserver pool as commsync does and let each worker parse its share twice."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from commsync.connectors.mailpool import PRELOAD, MailOptions, RawMail

    samples = _samples(corpus, messages, seed)
    items = [RawMail(raw, None, False, {"uid": i}) for i, (_, raw) in enumerate(samples)]
    options = MailOptions(OWN, DOMAINS, 100_000)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        half = -(-len(items) // workers)
        parts = [items[i : i + half] for i in range(0, len(items), half)]
        first = list(pool.map(_worker_probe, parts, [options] * len(parts)))
        again = list(pool.map(_worker_probe, parts, [options] * len(parts)))
        fs = [p for p in _all_pids() if _is_forkserver(p)]
        fs_mem = _rollup(fs[0]) if fs else None
    return {"first": first, "again": again, "forkserver": fs_mem, "half": half, "preload": PRELOAD,
            "main_modules": len(sys.modules)}


# Run as a file, so that multiprocessing re-imports it in every worker as ``__mp_main__``,
# as it does with the ``commsync`` console script (whose first line imports the CLI).
_AS_CONSOLE_SCRIPT = """\
import json, sys
sys.path.insert(0, {tests!r})
from commsync.daemon.cli import main  # the console script's import
import bench_profile
if __name__ == "__main__":
    print(json.dumps(bench_profile.probe_pool({corpus!r}, {messages}, {seed}, {workers})))
"""


def cmd_memory(args: argparse.Namespace) -> None:
    print("## memory of the parse pool's processes\n")
    print("Fresh interpreters importing what each process needs:\n")
    print("| import | RSS MB | private MB | modules |")
    print("|---|---:|---:|---:|")
    for label, stmt in _IMPORTS.items():
        code = (f"{stmt}\nimport sys\nf=open('/proc/self/smaps_rollup').read().split()\n"
                "v=dict(zip(f[::3],f[1::3]))\nprint(int(v['Rss:']), int(v['Private_Clean:'])+int(v['Private_Dirty:']), len(sys.modules))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode:
            print(f"| {label} | failed: {res.stderr.strip().splitlines()[-1][:80]} | | |")
            continue
        rss, private, mods = map(int, res.stdout.split())
        print(f"| {label} | {rss / 1024:.1f} | {private / 1024:.1f} | {mods} |")

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "commsync_like.py"
        script.write_text(_AS_CONSOLE_SCRIPT.format(tests=str(HERE), corpus=args.corpus, messages=args.messages, seed=args.seed,
                                                    workers=args.workers))
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
        like_commsync = json.loads(res.stdout.strip().splitlines()[-1])
    runs = [("main module: a small script (imports the corpus only)", probe_pool(args.corpus, args.messages, args.seed, args.workers)),
            ("main module: like the `commsync` console script (imports commsync.daemon.cli)", like_commsync)]
    for label, r in runs:
        print(f"\nforkserver workers, {label}; preload {r['preload']}; {len(r['first'])} workers, each parsing "
              f"{r['half']:,} {args.corpus} messages twice (MB):\n")
        print("| worker | before: RSS / PSS / private | after 1st batch | after 2nd batch | modules in the worker |")
        print("|---|---:|---:|---:|---:|")
        for i, (a, b) in enumerate(zip(r["first"], r["again"], strict=True)):
            def f(m):
                return f"{m['rss'] / 1024:.0f} / {m['pss'] / 1024:.0f} / {m['private'] / 1024:.0f}"

            print(f"| {i + 1} | {f(a['before'])} | {f(a['after'])} | {f(b['after'])} | {a['modules']} |")
        fs_mem = r["forkserver"]
        if fs_mem:
            print(f"\nforkserver: RSS {fs_mem['rss'] / 1024:.0f} MB, PSS {fs_mem['pss'] / 1024:.0f} MB, "
                  f"private {fs_mem['private'] / 1024:.0f} MB; modules in the main process: {r['main_modules']}")


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def _is_forkserver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return b"multiprocessing.forkserver" in cmd and ppid == os.getpid()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, default_n in (("parse", cmd_parse, 3000), ("daemon", cmd_daemon, 10_000), ("fetch", cmd_fetch, 10_000),
                                ("whatif", cmd_whatif, 10_000), ("memory", cmd_memory, 1000)):
        s = sub.add_parser(name)
        s.set_defaults(fn=fn)
        s.add_argument("--corpus", default="business", choices=list(CORPORA))
        s.add_argument("--messages", type=int, default=default_n)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--top", type=int, default=15)
        if name == "daemon":
            s.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
            s.add_argument("--keep-raw", help="copy py-spy's raw stacks to this file")
        if name == "whatif":
            s.add_argument("--runs", type=int, default=3)
            s.add_argument("--quiet-timeout", type=float, default=30.0, help="longest wait for a quiet machine before a run")
        if name == "memory":
            s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
