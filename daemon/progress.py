"""Progress of long passes (a first sync, an mbox import): a bar per source, or `progress` events.

A runner listener (see Runner's ``listeners``), fed by ``batch_stored`` and
the end of each pass; connectors know nothing of it. Items done are counted
over the pass (records, skipped and malformed items of every batch); the
total is that plus the source's backlog (the items it found but has not
handed out yet: the rest of the IMAP folder being read, of the mbox file), so
it grows when the next folder is scanned. A source without a backlog (Twilio)
shows a count and a rate. The rate is measured from the pass's first batch,
leaving out the one-off start (login, folder scan, indexing the mbox file).

On a terminal it draws rich bars on stderr; log lines written meanwhile go
above them (rich's Live redirects sys.stderr, which logs.py writes to).
Otherwise it logs a ``progress`` event per source at most every EVERY_S
seconds, and one at the end of each pass. In the long-running service
(``service=True``) a source shows progress only while a pass has a backlog
(its first sync, a long outage): steady passes of a few items stay silent
and no bar stays on screen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, ProgressColumn, Task, TaskID, TextColumn
from rich.progress import Progress as Bars
from rich.text import Text

log = structlog.get_logger(__name__)

# At most one `progress` event per source this often (seconds), besides the one at the end of a pass.
EVERY_S = 10.0


@dataclass
class _Pass:
    """What one source's current pass has done so far."""

    stream: str | None = None
    done: int = 0
    total: int | None = None
    # The first batch: the rate is measured from here.
    first_at: float | None = None
    first_done: int = 0
    logged: float = 0.0
    task: TaskID | None = None


def rate(done: int, since_done: int, seconds: float) -> float | None:
    """Items per second since a point, or None when too little time or work has passed to say."""
    if seconds <= 0 or done <= since_done:
        return None
    return (done - since_done) / seconds


def eta(done: int, total: int | None, per_s: float | None) -> float | None:
    """Seconds until ``total`` at ``per_s``; 0 when there; None when either is unknown."""
    if total is None:
        return None
    if done >= total:
        return 0.0
    if not per_s:
        return None
    return (total - done) / per_s


def items_in(batch: Any) -> int:
    """Items a batch accounts for: stored, left out with a reason, or quarantined."""
    return len(batch.records) + batch.skipped + len(batch.malformed)


class Progress:
    """Runner listener that shows how far each source's pass has come.

    ``runner`` (set by whoever builds the Runner) is where the backlog is read;
    without it totals are unknown. ``console`` forces the terminal mode onto a
    given rich Console; ``terminal`` says whether there is one to draw on.
    """

    def __init__(
        self,
        *,
        terminal: bool,
        service: bool = False,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        every: float | None = None,
    ):
        self.terminal = terminal or console is not None
        self.service = service
        self.console = console
        self.clock = clock
        self.every = EVERY_S if every is None else every
        self.runner: Any = None
        self._passes: dict[str, _Pass] = {}
        self._bars: Bars | None = None

    @classmethod
    def for_stderr(cls, *, service: bool = False) -> Progress:
        """Bars when stderr is a terminal, `progress` events when it is not (systemd, CI, a pipe)."""
        return cls(terminal=sys.stderr.isatty(), service=service)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Take the bars down (a one-off run leaves their last state on screen)."""
        self._passes.clear()
        self._hide()

    # -- runner listener callbacks ---------------------------------------------------

    def batch_stored(self, source: str, batch: Any, seconds: float) -> None:
        now = self.clock()
        backlog = self._backlog(source)
        p = self._passes.get(source)
        if p is None:
            if self.service and not backlog:
                return  # caught up after this batch: a steady pass, nothing to show
            p = self._passes[source] = _Pass(logged=now)
        p.stream = batch.stream
        p.done += items_in(batch)
        p.total = p.done + backlog if backlog is not None else None
        if p.first_at is None:
            p.first_at, p.first_done = now, p.done
        if self.terminal:
            self._draw(source, p, now)
        elif now - p.logged >= self.every:
            p.logged = now
            self._log(source, p, now)

    def pass_succeeded(self, status: Any) -> None:
        self._pass_ended(status, failed=False)

    def pass_failed(self, status: Any) -> None:
        self._pass_ended(status, failed=True)

    def source_removed(self, name: str) -> None:
        p = self._passes.pop(name, None)
        if p is not None:
            self._drop_bar(p)

    # -- the end of a pass -------------------------------------------------------------

    def _pass_ended(self, status: Any, *, failed: bool) -> None:
        now = self.clock()
        p = self._passes.get(status.name)
        if p is None:
            if self.service:
                return
            # A one-off run accounts for every source, even one with nothing new.
            p = self._passes[status.name] = _Pass(logged=now)
        backlog = status.backlog
        p.total = p.done + backlog if backlog is not None else None
        if self.terminal:
            self._draw(status.name, p, now, note="failed" if failed else "")
        else:
            self._log(status.name, p, now, final=True)
        if self.service:
            # The next pass starts from nothing; a caught-up source shows no bar.
            del self._passes[status.name]
            self._drop_bar(p)

    # -- output ------------------------------------------------------------------------

    def _backlog(self, source: str) -> int | None:
        status = getattr(self.runner, "status", {}).get(source)
        return status.backlog if status is not None else None

    def _measure(self, p: _Pass, now: float) -> tuple[float | None, float | None]:
        per_s = rate(p.done, p.first_done, now - p.first_at) if p.first_at is not None else None
        return per_s, eta(p.done, p.total, per_s)

    def _log(self, source: str, p: _Pass, now: float, *, final: bool = False) -> None:
        per_s, left = self._measure(p, now)
        fields: dict[str, Any] = {
            "source": source,
            "stream": p.stream,
            "done": p.done,
            "total": p.total,
            "rate_per_s": round(per_s, 1) if per_s is not None else None,
            "eta_s": round(left) if left is not None else None,
        }
        if final:
            fields["final"] = True
        log.info("progress", **fields)

    def _draw(self, source: str, p: _Pass, now: float, *, note: str = "") -> None:
        per_s, left = self._measure(p, now)
        fields = {
            "rate": f"{per_s:,.1f}/s" if per_s is not None else "–/s",
            "eta": ("eta " + _clock(left)) if left is not None else "",
            "note": note,
        }
        label = source if p.stream is None else f"{source} {p.stream}"
        bars = self._show()
        if p.task is None:
            p.task = bars.add_task(label, total=p.total, completed=p.done, **fields)
        else:
            bars.update(p.task, description=label, total=p.total, completed=p.done, **fields)
        # Drawn now, not at the next tick: a batch is seconds of work, a redraw is nothing.
        bars.refresh()

    def _show(self) -> Bars:
        if self._bars is None:
            self._bars = Bars(
                TextColumn("{task.description}"),
                BarColumn(),
                _Count(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"),
                TextColumn("[red]{task.fields[note]}"),
                console=self.console or Console(stderr=True),
                # Bars of the service come and go with a backlog; a one-off run leaves its last state.
                transient=self.service,
                # stdout carries command output (dry-run records): routed above the bars only
                # when it is the same terminal, never into a pipe's place.
                redirect_stdout=sys.stdout.isatty(),
                redirect_stderr=True,
                refresh_per_second=4,
            )
            self._bars.start()
        return self._bars

    def _drop_bar(self, p: _Pass) -> None:
        if self._bars is None or p.task is None:
            return
        self._bars.remove_task(p.task)
        p.task = None
        if not self._bars.tasks:
            self._hide()

    def _hide(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


class _Count(ProgressColumn):
    """``done/total``, or ``done`` alone when the total is unknown."""

    def render(self, task: Task) -> Text:
        done = int(task.completed)
        if task.total is None:
            return Text(f"{done:,}", style="progress.download")
        return Text(f"{done:,}/{int(task.total):,}", style="progress.download")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
