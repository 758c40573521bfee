"""/healthz and /metrics over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from datetime import timedelta

import pytest

from commsync.connectors.base import Batch
from commsync.daemon.http import HttpEndpoint
from commsync.daemon.metrics import Metrics
from commsync.daemon.retry import RetryPolicy
from commsync.daemon.runner import Runner, StoreSink
from commsync.daemon.store import Store

from eventually import eventually
from records import T0, email_record, hours


class Source:
    kind = "test"

    def __init__(self, name, total, fail=False):
        self.name, self.total, self.fail = name, total, fail

    async def batches(self, state):
        if self.fail:
            raise ConnectionError("remote went away")
        done = state.get("s", {}).get("done", 0)
        for start in range(done, self.total, 2):
            end = min(start + 2, self.total)
            yield Batch("s", [email_record(f"{self.name}-{i}@x", at=T0 + hours(i), source=self.name, uid=i) for i in range(start, end)], {"done": end})

    async def check(self):
        return "ok"

    async def aclose(self):
        return None


def get(port: int, path: str) -> tuple[int, str, str]:
    """A plain HTTP GET (urllib): status, content type, body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


@pytest.fixture
async def served(memory_store):
    """A running runner (one good, one failing source) with its HTTP endpoint on a free port."""
    metrics = Metrics()
    runner = Runner(
        [Source("good", 5), Source("bad", 0, fail=True)],
        StoreSink(memory_store),
        poll_interval=timedelta(seconds=30),
        policy=RetryPolicy(backoff_max=timedelta(seconds=30)),
        listeners=[metrics],
    )
    task = asyncio.create_task(runner.run())
    http = HttpEndpoint(runner, memory_store, metrics, host="127.0.0.1", port=0)
    await http.start()
    await eventually(lambda: runner.status["good"].passes >= 1 and runner.status["bad"].failures >= 1)
    yield runner, http, task
    runner.stop()
    await asyncio.wait_for(task, 10)
    await http.close()


async def test_healthz_is_200_while_loop_runner_and_mongodb_are_fine(served):
    runner, http, task = served
    status, ctype, body = await asyncio.to_thread(get, http.port, "/healthz")
    assert status == 200 and ctype == "application/json"
    assert json.loads(body) == {"status": "ok", "loop": "ok", "runner": "running", "mongodb": "ok", "sources": 2}
    # A failing source is not an unhealthy daemon: it is in the metrics instead.
    runner.stop()
    await asyncio.wait_for(task, 10)
    status, _, body = await asyncio.to_thread(get, http.port, "/healthz")
    assert status == 503 and json.loads(body)["runner"] == "stopped"


async def test_metrics_in_prometheus_format(served):
    runner, http, _ = served
    status, ctype, body = await asyncio.to_thread(get, http.port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=")
    lines = body.splitlines()
    assert 'commsync_records_captured_total{channel="email",source="good"} 5.0' in lines
    assert 'commsync_batch_seconds_count{source="good"} 3.0' in lines  # 2 + 2 + 1 records
    assert 'commsync_source_errors_total{source="bad"} 1.0' in lines
    assert 'commsync_source_consecutive_failures{source="bad"} 1.0' in lines
    success = next(line for line in lines if line.startswith('commsync_last_success_timestamp_seconds{source="good"}'))
    assert float(success.split()[-1]) == pytest.approx(runner.status["good"].last_success.timestamp())
    assert not any(line.startswith('commsync_last_success_timestamp_seconds{source="bad"}') for line in lines)


async def test_unknown_paths_and_methods(served):
    _, http, _ = served
    assert (await asyncio.to_thread(get, http.port, "/"))[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{http.port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        await asyncio.to_thread(urllib.request.urlopen, request, None, 10)
    assert err.value.code == 405


async def test_healthz_is_503_while_mongodb_does_not_answer():
    # Nothing listens on port 9: the driver cannot select a server.
    store = Store.connect("mongodb://127.0.0.1:9", "commsync_test", timeout_ms=300)
    runner = Runner([], StoreSink(store))
    task = asyncio.create_task(runner.run())
    http = HttpEndpoint(runner, store, Metrics(), host="127.0.0.1", port=0, ping_timeout=3)
    await http.start()
    try:
        status, _, body = await asyncio.to_thread(get, http.port, "/healthz")
    finally:
        runner.stop()
        await asyncio.wait_for(task, 10)
        await http.close()
        store.close()
    assert status == 503
    health = json.loads(body)
    assert health["status"] == "unhealthy" and health["runner"] == "running" and health["mongodb"] != "ok"
