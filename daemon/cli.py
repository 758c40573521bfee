"""The `commsync` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import structlog

from commsync.config import ConfigError, Settings, load_settings
from commsync.connectors.base import check_steps
from commsync.connectors.mbox import MboxConnector

from . import admin_cli, app, auth_cli, logs, service, sources_cli, status, verify, watch
from .progress import Progress
from .runner import DryRunSink, Runner, StoreSink
from .text import describe

log = structlog.get_logger(__name__)

DEFAULT_CONFIG = "/etc/commsync/commsync.yaml"


def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a subcommand the -c/--config option."""
    p.add_argument(
        "-c", "--config", default=os.environ.get("COMMSYNC_CONFIG", DEFAULT_CONFIG), help="YAML config file (default: %(default)s)"
    )
    return p


def quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-q", "--quiet", action="store_true", help="no progress: neither bars (on a terminal) nor `progress` events (otherwise)"
    )


def _progress(args: Any, *, service: bool = False) -> Progress | None:
    """Progress for a long pass, unless --quiet: bars on a terminal, `progress` events otherwise."""
    return None if args.quiet else Progress.for_stderr(service=service)


def _watch(runner: Runner, progress: Progress | None) -> Any:
    """Let ``progress`` read the runner's backlogs; a context that takes its bars down at the end."""
    if progress is None:
        return nullcontext()
    progress.runner = runner
    return progress


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="commsync", description="Capture customer email, calls and texts into MongoDB.")
    sub = parser.add_subparsers(dest="command", required=True)

    # Each command is `handler(settings, args) -> exit code` (async), set with set_defaults.
    run = with_config(sub.add_parser("run", help="capture until stopped (SIGTERM/SIGINT)"))
    run.set_defaults(handler=_run)
    run.add_argument("--once", action="store_true", help="one pass over every source, then exit (1 if a source failed)")
    run.add_argument("--dry-run", action="store_true", help="print records as JSON lines; write nothing (implies --once)")
    quiet(run)

    with_config(sub.add_parser("check", help="validate the config, reach MongoDB, log in to every source")).set_defaults(handler=_check)

    imp = sub.add_parser("import", help="backfill an archive")
    imp_sub = imp.add_subparsers(dest="format", required=True)
    mbox = with_config(imp_sub.add_parser("mbox", help="an mbox file (Gmail Takeout, Thunderbird)"))
    mbox.add_argument("file", type=Path)
    mbox.add_argument("--name", help="source name for checkpoints (default: mbox-FILENAME)")
    quiet(mbox)
    mbox.set_defaults(handler=_import)

    rebuild = with_config(sub.add_parser("rebuild-history", help="recompute every customer history from the records"))
    rebuild.add_argument(
        "--check", action="store_true", help="write nothing: print the customers whose stored history differs from a rebuild (exit 1 if any)"
    )
    rebuild.set_defaults(handler=_rebuild)
    st = with_config(sub.add_parser("status", help="every source from MongoDB: owner, last success, last error, backlog"))
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(handler=status.show_status)
    admin_cli.register(sub, with_config)
    verify.register(sub, with_config)
    sources_cli.register(sub, with_config)
    watch.register(sub, with_config)

    auth = sub.add_parser("auth", help="OAuth2 sign-in for mailboxes that use a refresh token")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    auth_login = with_config(auth_sub.add_parser("login", help="sign in (device code or browser) and save the mailbox's refresh token"))
    auth_login.add_argument("name", help="the mailbox's name in the config")
    auth_login.set_defaults(handler=auth_cli.login_command)
    sub.add_parser("demo", help="import a bundled sample mailbox and Twilio account into an in-memory store and show the histories")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        logs.configure("warning")
        return asyncio.run(run_demo(sys.stdout))
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        logs.configure("info")
        print(f"commsync: invalid configuration\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    return asyncio.run(args.handler(settings, args))


def _install_signals(runner: Runner) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)


async def _run(settings: Settings, args: Any) -> int:
    if not settings.sources():
        print(f"commsync: the config lists no sources ({app.source_names(settings)})", file=sys.stderr)
        return 2
    if not (args.once or args.dry_run):
        # The long-running service: sd_notify, watchdog, SIGHUP reload, leases, HTTP, upkeep.
        progress = _progress(args, service=True)
        with progress or nullcontext():
            return await service.serve(settings, args.config, progress=progress)
    dry = args.dry_run
    with app.parse_pool(settings) as pool:
        connectors = app.build_connectors(settings, pool)
        store = None
        if dry:
            sink: Any = DryRunSink()
        else:
            store = app.open_store(settings)
            await store.ping()
            await store.init_db()
            sink = StoreSink(store)
        progress = _progress(args)
        runner = Runner(
            connectors,
            sink,
            once=args.once or dry,
            poll_interval=settings.daemon.poll_interval,
            intervals={s.name: s.poll_interval for s in settings.sources() if getattr(s, "poll_interval", None)},
            policy=app.retry_policy(settings),
            listeners=[progress] if progress else [],
        )
        _install_signals(runner)
        log.info("started", sources=len(connectors), dry_run=dry, once=runner.once)
        with _watch(runner, progress):
            ok = await runner.run()
        if store is not None:
            store.close()
    log.info("stopped", ok=ok)
    return 0 if ok or not runner.once else 1


async def _check(settings: Settings, args: Any) -> int:
    failed = False

    def line(ok: bool, what: str, detail: str) -> None:
        nonlocal failed
        failed |= not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what:<24} {detail}", flush=True)

    line(True, "config", args.config)
    store = app.open_store(settings)
    try:
        await store.ping()
        line(True, "mongodb", f"database {settings.mongodb.database}")
    except Exception as exc:
        line(False, "mongodb", describe(exc))
    finally:
        store.close()
    for connector in app.build_connectors(settings, None):
        # A connector may check in steps (an OAuth2 mailbox: token, then login), one line each.
        try:
            for step, run in check_steps(connector):
                what = f"{connector.kind} {connector.name}" + (f" {step}" if step else "")
                try:
                    line(True, what, await run())
                except Exception as exc:
                    line(False, what, describe(exc))
                    break
        finally:
            await connector.aclose()
    return 1 if failed else 0


async def _import(settings: Settings, args: Any) -> int:
    if not args.file.is_file():
        print(f"commsync: {args.file}: no such file", file=sys.stderr)
        return 2
    with app.parse_pool(settings) as pool:
        parser = app.mail_parser(settings, pool, app.all_own_addresses(settings))
        connector = MboxConnector(args.file, parser, name=args.name)
        store = app.open_store(settings)
        await store.ping()
        await store.ensure_indexes()
        progress = _progress(args)
        runner = Runner([connector], StoreSink(store), once=True, listeners=[progress] if progress else [])
        _install_signals(runner)
        with _watch(runner, progress):
            ok = await runner.run()
        store.close()
    status = runner.status[connector.name]
    print(f"imported {status.records} records from {args.file}" + ("" if ok else f"; failed: {status.last_error}"))
    return 0 if ok else 1


async def _rebuild(settings: Settings, args: Any) -> int:
    store = app.open_store(settings)
    try:
        if args.check:
            return _report_check(await store.check_history())
        docs = await store.rebuild_history(write=True)
    finally:
        store.close()
    print(f"rebuilt the history of {len(docs)} customers")
    return 0


def _report_check(check: Any) -> int:
    if not check.differences:
        print(f"every stored history equals a rebuild ({check.customers} customers)")
        return 0
    for cid in sorted(check.differences, key=str):
        for line in check.differences[cid]:
            print(f"{cid}: {line}")
    print(f"{len(check.differences)} of {check.customers} customers differ from a rebuild (`commsync rebuild-history` rewrites them)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
