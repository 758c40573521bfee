"""Runner semantics with in-process connectors: checkpoint after store, isolation, shutdown."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr
from structlog.testing import capture_logs

from commsync.connectors import registry
from commsync.connectors.base import Batch, CredentialsRefused, TemporarilyUnavailable
from commsync.daemon import runner as runner_module
from commsync.daemon.clock import now_utc
from commsync.daemon.retry import RetryPolicy
from commsync.daemon.runner import DryRunSink, Runner, StoreSink

from eventually import eventually
from records import T0, email_record, hours
from sinks import CrashingSink


class ListConnector:
    """Yields numbered records in batches, resuming after the checkpoint."""

    kind = "test"

    def __init__(self, name, total, batch=3, fail_at=None, gate=None):
        self.name, self.total, self.batch, self.fail_at, self.gate = name, total, batch, fail_at, gate
        self.closed = False

    async def batches(self, state):
        done = state.get("s", {}).get("done", 0)
        for start in range(done, self.total, self.batch):
            if self.fail_at is not None and start >= self.fail_at:
                raise ConnectionError("remote went away")
            if self.gate is not None:
                await self.gate.wait()
            end = min(start + self.batch, self.total)
            recs = [email_record(f"{self.name}-{i}@x", at=T0 + hours(i), source=self.name, uid=i) for i in range(start, end)]
            yield Batch("s", recs, {"done": end})

    async def check(self):
        return "ok"

    async def aclose(self):
        self.closed = True


class AuthFailing(ListConnector):
    async def batches(self, state):
        raise CredentialsRefused("login refused")
        yield  # pragma: no cover


async def test_checkpoint_is_saved_only_after_the_batch_is_stored(memory_store):
    runner = Runner([ListConnector("a", 10)], CrashingSink(memory_store, after=1), once=True)
    assert await runner.run() is False
    assert (await memory_store.load_state("a")) == {"s": {"done": 3}}
    # The second batch is stored although its checkpoint is not: the restart re-reads it.
    assert await memory_store.records.count_documents({}) == 6

    assert await Runner([ListConnector("a", 10)], StoreSink(memory_store), once=True).run() is True
    assert await memory_store.records.count_documents({}) == 10
    for doc in await memory_store.records.find().to_list(None):
        assert len(doc["sources"]) == 1
    assert (await memory_store.load_state("a")) == {"s": {"done": 10}}


async def test_one_failing_source_does_not_stop_the_others(memory_store):
    broken, auth, good = ListConnector("broken", 10, fail_at=3), AuthFailing("auth", 1), ListConnector("good", 7)
    runner = Runner([broken, auth, good], StoreSink(memory_store), once=True)
    assert await runner.run() is False
    assert runner.status["good"].last_error is None and runner.status["good"].records == 7
    assert "ConnectionError" in runner.status["broken"].last_error
    assert "CredentialsRefused" in runner.status["auth"].last_error
    assert await memory_store.records.count_documents({"sources.source": "good"}) == 7
    assert await memory_store.records.count_documents({"sources.source": "broken"}) == 3
    assert broken.closed and good.closed


async def test_failing_source_is_retried_with_backoff_while_others_run(memory_store):
    class Flaky(ListConnector):
        attempts = 0

        async def batches(self, state):
            Flaky.attempts += 1
            if Flaky.attempts < 3:
                raise ConnectionError("try again")
            async for b in super().batches(state):
                yield b

    # The schedule itself is tested in test_retry.py; here it is made fast.
    fast = RetryPolicy(backoff_max=timedelta(milliseconds=10))
    runner = Runner([Flaky("flaky", 4)], StoreSink(memory_store), poll_interval=timedelta(seconds=30), policy=fast)
    task = asyncio.create_task(runner.run())
    await eventually(lambda: runner.status["flaky"].passes == 1, what="the third attempt succeeded")
    runner.stop()
    assert await asyncio.wait_for(task, 5) is True
    assert Flaky.attempts == 3 and runner.status["flaky"].failures == 0


async def test_stop_finishes_the_batch_in_hand_and_checkpoints_it(memory_store):
    gate = asyncio.Event()
    gate.set()

    class SlowSink(StoreSink):
        async def write(self, source, batch):
            gate.clear()  # the connector waits at its next batch
            runner.stop()  # stop arrives while this batch is in hand
            await asyncio.sleep(0.05)
            await super().write(source, batch)

    runner = Runner([ListConnector("a", 9, gate=gate)], SlowSink(memory_store))
    assert await asyncio.wait_for(runner.run(), 5) is True
    assert await memory_store.records.count_documents({}) == 3
    assert await memory_store.load_state("a") == {"s": {"done": 3}}
    # Cut short, so not a successful pass: `commsync status` must not say the source is caught up.
    assert runner.status["a"].last_success is None and runner.status["a"].records == 3


async def test_dry_run_prints_json_lines_and_keeps_no_state():
    out = io.StringIO()
    sink = DryRunSink(out)
    assert await Runner([ListConnector("a", 5)], sink, once=True).run() is True
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["_id"] for r in lines] == [f"a-{i}@x" for i in range(5)]
    assert lines[0]["occurred_at"].startswith("2025-03-01T09:00:00")
    assert await sink.load_state("a") == {}


@pytest.mark.parametrize("n", [0, 1])
async def test_empty_sources_finish(memory_store, n):
    assert await Runner([ListConnector("a", n)], StoreSink(memory_store), once=True).run() is True


async def test_a_lease_lost_during_the_write_keeps_the_checkpoint_where_it_was(memory_store):
    class LeaseRunsOut:
        """Ours when the batch is taken, gone by the time its write returns (a stalled instance)."""

        def __init__(self):
            self.held = True

        def holds(self, source):
            return self.held

    lease = LeaseRunsOut()

    class StallingSink(StoreSink):
        async def write(self, source, batch):
            await super().write(source, batch)
            lease.held = False

    runner = Runner([], StallingSink(memory_store), leases=lease)
    stored = await runner.run_pass(ListConnector("a", 9))
    assert stored == 0  # written, but not counted as done: no checkpoint moved
    assert await memory_store.records.count_documents({}) == 3  # upserts: the new owner re-reads them harmlessly
    assert await memory_store.load_state("a") == {}


# -- refused credentials: backoff, parking, resume ------------------------------------------------

FAST_REFUSALS = RetryPolicy(
    backoff_max=timedelta(milliseconds=10),
    auth_backoff_min=timedelta(milliseconds=10),
    auth_backoff_max=timedelta(milliseconds=20),
    park_after=timedelta(milliseconds=150),
)


class Refusing(ListConnector):
    """Refuses its credentials until ``fixed``; counts its login attempts."""

    def __init__(self, name, total=2, error=None):
        super().__init__(name, total)
        self.attempts = 0
        self.fixed = False
        self.error = error or CredentialsRefused("login refused for sales@example.com")

    async def batches(self, state):
        self.attempts += 1
        if not self.fixed:
            raise self.error
        async for b in super().batches(state):
            yield b


def _count_parked_polls(monkeypatch) -> list[str]:
    """Every look a parked worker takes (it computes the source's fingerprint each time)."""
    polls: list[str] = []
    real = runner_module._fingerprint

    def counting(connector):
        polls.append(connector.name)
        return real(connector)

    monkeypatch.setattr(runner_module, "_fingerprint", counting)
    return polls


async def test_a_source_refused_for_long_is_parked_while_the_others_capture(memory_store, monkeypatch):
    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    refusing, good = Refusing("sales"), ListConnector("good", 4)
    runner = Runner([refusing, good], StoreSink(memory_store), poll_interval=timedelta(seconds=30), policy=FAST_REFUSALS)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].state == "parked", what="parked")
        doc = await memory_store.source_status("sales")
        assert doc["state"] == "parked" and doc["parked_reason"].startswith("credentials refused since ")
        attempts = refusing.attempts
        polls = _count_parked_polls(monkeypatch)
        await eventually(lambda: len(polls) >= 5, what="five looks while parked")  # many backoff periods
        assert refusing.attempts == attempts  # a parked source does not log in
        assert await memory_store.records.count_documents({"sources.source": "good"}) == 4

        # `commsync source resume sales`, after the password was fixed.
        refusing.fixed = True
        assert await memory_store.request_resume("sales")
        await eventually(lambda: runner.status["sales"].records == 2, what="resumed and captured")
        assert runner.status["sales"].state == "waiting" and runner.status["sales"].refused_since is None
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_parked_source_stays_parked_across_a_restart(memory_store, monkeypatch):
    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    first = Runner([Refusing("sales")], StoreSink(memory_store), policy=FAST_REFUSALS)
    task = asyncio.create_task(first.run())
    await eventually(lambda: first.status["sales"].state == "parked")
    first.stop()
    await asyncio.wait_for(task, 5)

    again = Refusing("sales")
    second = Runner([again], StoreSink(memory_store), policy=FAST_REFUSALS)
    polls = _count_parked_polls(monkeypatch)
    task = asyncio.create_task(second.run())
    try:
        await eventually(lambda: second.status["sales"].state == "parked")
        await eventually(lambda: len(polls) >= 5, what="five looks while parked")
        assert again.attempts == 0  # no login at all: it was parked before the restart
    finally:
        second.stop()
        await asyncio.wait_for(task, 5)


async def test_outages_are_retried_and_never_park(memory_store):
    down = Refusing("sales", error=TemporarilyUnavailable("connection reset during login"))
    runner = Runner([down], StoreSink(memory_store), policy=FAST_REFUSALS)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: down.attempts >= 20, what="keeps retrying")
        assert runner.status["sales"].state in ("backoff", "syncing") and runner.status["sales"].refused_since is None
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_one_off_pass_by_hand_leaves_the_live_status_alone(memory_store):
    await memory_store.save_source_status("sales", {"state": "waiting", "consecutive_failures": 0})
    assert await Runner([Refusing("sales")], StoreSink(memory_store), once=True).run() is False
    doc = await memory_store.source_status("sales")
    assert doc["consecutive_failures"] == 0 and "last_error" not in doc


async def test_the_shutdown_deadline_abandons_a_stuck_batch_and_says_so(memory_store):
    class Stuck(StoreSink):
        async def write(self, source, batch):
            runner.stop()
            await asyncio.sleep(30)  # a database that stopped answering

    runner = Runner([ListConnector("a", 9)], Stuck(memory_store), shutdown_timeout=timedelta(milliseconds=100))
    with capture_logs() as logs:
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(runner.run(), 5)
    assert asyncio.get_running_loop().time() - started < 2
    abandoned = [e for e in logs if e["event"] == "shutdown_abandoned"]
    assert abandoned and abandoned[0]["source"] == "a" and abandoned[0]["in_hand"] == "s: 3 records"
    assert await memory_store.load_state("a") == {}  # nothing checkpointed past what is stored


async def test_a_parked_source_is_tried_again_once_its_config_or_secret_file_changes(memory_store, tmp_path, monkeypatch):
    class Config(BaseModel):
        name: str
        host: str
        password_file: Path

    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    secret = tmp_path / "sales.pw"
    secret.write_text("old password\n")

    def refusing(host="imap.example"):
        connector = Refusing("sales")
        connector.config = Config(name="sales", host=host, password_file=secret)
        return connector

    async def run_until_settled(connector):
        runner = Runner([connector], StoreSink(memory_store), policy=FAST_REFUSALS)
        task = asyncio.create_task(runner.run())
        await eventually(lambda: runner.status["sales"].state == "parked")
        runner.stop()
        await asyncio.wait_for(task, 5)
        return connector.attempts

    assert await run_until_settled(refusing()) > 0  # refused until parked
    assert await run_until_settled(refusing()) == 0  # the same config: still parked, no login
    assert await run_until_settled(refusing(host="imap2.example")) > 0  # the entry changed: tried again
    secret.write_text("the new password, longer\n")  # fixed on disk, entry unchanged: tried again
    assert await run_until_settled(refusing(host="imap2.example")) > 0


class SecretConfig(BaseModel):
    name: str
    host: str = "imap.example"
    password: SecretStr | None = None
    password_file: Path | None = None


def configured(password=None, password_file=None):
    """A refusing source with a config entry (what its fingerprint is made of)."""
    connector = Refusing("sales")
    connector.config = SecretConfig(name="sales", password=password, password_file=password_file)
    return connector


async def test_a_parked_source_is_tried_again_when_its_inline_secret_changes_and_the_config_reloads(memory_store, monkeypatch):
    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    runner = Runner([configured(password="old password")], StoreSink(memory_store), policy=FAST_REFUSALS)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].state == "parked", what="parked")
        # A reload restarts a source whose entry changed: remove, then add the new one.
        same = configured(password="old password")
        await runner.remove("sales")
        runner.add(same)
        await eventually(lambda: runner.status["sales"].state == "parked", what="still parked")
        assert same.attempts == 0  # the same secret: no login
        fixed = configured(password="the new password")
        fixed.fixed = True
        await runner.remove("sales")
        runner.add(fixed)
        await eventually(lambda: runner.status["sales"].records == 2, what="tried again with the new password")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_parked_source_is_tried_again_when_its_secret_file_is_written_anew_without_a_reload(memory_store, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    secret = tmp_path / "sales.pw"
    secret.write_text("old password\n")
    connector = configured(password_file=secret)
    runner = Runner([connector], StoreSink(memory_store), policy=FAST_REFUSALS)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].state == "parked", what="parked")
        connector.fixed = True
        secret.write_text("the new password, longer\n")
        await eventually(lambda: runner.status["sales"].records == 2, what="tried again with the new file")
        await eventually(lambda: _state_saved(memory_store, "sales", "waiting"), what="no longer parked in MongoDB")
        # The new fingerprint is the one kept: a restart does not take the source for a changed one.
        assert (await memory_store.source_status("sales"))["fingerprint"] == registry.fingerprint(connector.config)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_the_fingerprint_is_computed_once_per_source_not_at_every_status_save(memory_store, monkeypatch):
    # It may cost a PBKDF2 on the event loop; only a parked source looks for a new one.
    fingerprint, calls = registry.fingerprint, []
    monkeypatch.setattr(registry, "fingerprint", lambda config: calls.append(config) or fingerprint(config))
    connector = ListConnector("sales", 2)
    connector.config = SecretConfig(name="sales", password="a password")
    runner = Runner([connector], StoreSink(memory_store), poll_interval=timedelta(milliseconds=1))
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].passes >= 3, what="three passes, each saving its status")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)
    assert len(calls) == 1
    assert (await memory_store.source_status("sales"))["fingerprint"] == fingerprint(connector.config)


async def _state_saved(store, source, state):
    return ((await store.source_status(source)) or {}).get("state") == state


async def test_a_parked_source_rides_out_a_mongodb_outage(memory_store, monkeypatch):
    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)

    class FlakySink(StoreSink):
        down = False
        failed = 0

        async def load_source_status(self, source):
            if self.down:
                self.failed += 1
                raise ConnectionError("MongoDB is not answering")
            return await super().load_source_status(source)

    sink = FlakySink(memory_store)
    connector = Refusing("sales")
    runner = Runner([connector], sink, policy=FAST_REFUSALS)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].state == "parked", what="parked")
        with capture_logs() as logs:
            sink.down = True
            await eventually(lambda: sink.failed >= 5, what="looked again and again")
            sink.down = False
        assert not [e for e in logs if e["event"] == "worker_crashed"]
        assert [e["event"] for e in logs if e.get("source") == "sales"].count("parked_status_not_loaded") == 1  # once per outage
        assert runner.status["sales"].state == "parked" and not task.done()
        connector.fixed = True
        assert await memory_store.request_resume("sales")
        await eventually(lambda: runner.status["sales"].records == 2, what="resumed after the outage")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_parked_source_gives_back_a_lease_it_lost(memory_store, monkeypatch):
    from commsync.daemon.leases import LeaseKeeper

    monkeypatch.setattr(runner_module, "PARK_POLL_S", 0.02)
    keeper = LeaseKeeper(memory_store, owner="a", ttl=timedelta(seconds=1))
    runner = Runner([Refusing("sales")], StoreSink(memory_store), policy=FAST_REFUSALS, leases=keeper)
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: runner.status["sales"].state == "parked", what="parked")
        # Another instance holds it now (ours lapsed during a stall): the parked worker lets go.
        later = now_utc() + timedelta(hours=1)
        await memory_store.db["leases"].update_one({"_id": "sales"}, {"$set": {"owner": "b", "expires_at": later}})
        await eventually(lambda: runner.status["sales"].state == "waiting for lease", what="gave the lease back")
        assert not keeper.holds("sales") and "sales" not in keeper._held
    finally:
        runner.stop()
        await asyncio.wait_for(task, 5)


async def test_a_crash_after_a_successful_pass_waits_the_first_step_again(memory_store, monkeypatch):
    runner = Runner([ListConnector("a", 2)], StoreSink(memory_store), poll_interval=timedelta(seconds=30), policy=RetryPolicy(backoff_max=timedelta(milliseconds=10)))
    waits = 0
    wait_between_passes = runner._wait_between_passes

    async def crashing_twice(worker):
        nonlocal waits
        waits += 1
        if waits <= 2:
            raise RuntimeError("a bug between passes")
        await wait_between_passes(worker)

    monkeypatch.setattr(runner, "_wait_between_passes", crashing_twice)
    with capture_logs() as logs:
        task = asyncio.create_task(runner.run())
        await eventually(lambda: waits >= 3, what="two crashes, each after a successful pass")
        runner.stop()
        await asyncio.wait_for(task, 5)
    assert [e["crashes"] for e in logs if e["event"] == "worker_crashed"] == [1, 1]
