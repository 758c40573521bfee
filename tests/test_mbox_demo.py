"""mbox backfill and the bundled demo: the same normalize, match, store and history path as IMAP."""

from __future__ import annotations

import io
import json
import mailbox

from commsync.connectors.mailpool import MailOptions, MailParser
from commsync.connectors.mbox import MboxConnector
from commsync.daemon.cli import main
from commsync.daemon.demo import demo_files, run_demo
from commsync.daemon.runner import Runner, StoreSink

from mailgen import message


def write_mbox(path, messages):
    box = mailbox.mbox(path)
    for raw in messages:
        box.add(raw)
    box.flush()
    box.close()


def parser():
    return MailParser(MailOptions(frozenset({"sales@ourco.example"}), frozenset({"ourco.example"}), 100_000))


async def test_mbox_import_resumes_from_its_checkpoint(tmp_path, memory_store):
    path = tmp_path / "archive.mbox"
    write_mbox(path, [message(i) for i in range(7)])
    await memory_store.customers.insert_one({"_id": "c", "emails": ["alice@example.com"]})

    class StopAfterFirst(StoreSink):
        async def save_checkpoint(self, source, stream, checkpoint):
            await super().save_checkpoint(source, stream, checkpoint)
            runner.stop()

    runner = Runner([MboxConnector(path, parser(), batch_size=3)], StopAfterFirst(memory_store), once=True)
    await runner.run()
    assert await memory_store.load_state("mbox-archive.mbox") == {"messages": {"done": 3}}
    assert await memory_store.records.count_documents({}) == 3

    ok = await Runner([MboxConnector(path, parser(), batch_size=3)], StoreSink(memory_store), once=True).run()
    assert ok
    assert await memory_store.records.count_documents({}) == 7
    assert (await memory_store.history.find_one({"_id": "c"}))["total"] == 7
    assert all(len(r["sources"]) == 1 for r in await memory_store.records.find().to_list(None))


async def test_mbox_from_quoting_is_undone(tmp_path, memory_store):
    path = tmp_path / "q.mbox"
    raw = b"From: a@example.com\nTo: sales@ourco.example\nSubject: q\nMessage-ID: <q@x>\n\nHello\nFrom the team.\n"
    write_mbox(path, [raw])
    assert b">From the team" in path.read_bytes()  # how mbox stores it
    await Runner([MboxConnector(path, parser())], StoreSink(memory_store), once=True).run()
    rec = await memory_store.records.find_one({"_id": "q@x"})
    assert "\nFrom the team." in rec["content"] and ">From" not in rec["content"]


def test_cli_import_mbox(tmp_path, capsys):
    path = tmp_path / "a.mbox"
    write_mbox(path, [message(i) for i in range(4)])
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"mongodb": {"uri": "memory://"}, "daemon": {"parse_workers": 1}}))
    assert main(["import", "mbox", str(path), "-c", str(config)]) == 0
    assert "imported 4 records" in capsys.readouterr().out
    assert main(["import", "mbox", str(tmp_path / "missing.mbox"), "-c", str(config)]) == 2


async def test_demo_prints_every_customer_history():
    mbox_path, customers_path = demo_files()
    customers = json.loads(customers_path.read_text())
    out = io.StringIO()
    assert await run_demo(out) == 0
    text = out.getvalue()
    assert "nothing is kept" in text
    for customer in customers:
        assert customer["_id"] in text
    # The sample holds one message twice: it is one record. Its newsletter (List-Unsubscribe)
    # is automated mail, which is not captured unless capture_automated is set.
    automated = ("Auto-Submitted", "List-Id", "Precedence", "List-Unsubscribe")
    distinct = {m["Message-ID"] for m in mailbox.mbox(mbox_path) if not any(m[h] for h in automated)}
    assert f"{mbox_path.name}, {len(distinct)} records" in text
    assert "Not captured (automated): 1" in text
