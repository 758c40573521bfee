"""The admin commands as a user types them, on one seeded in-process store."""

from __future__ import annotations

import csv
import io
import json

import pytest

from commsync.config import settings_from_dict
from commsync.daemon import admin_cli, app
from commsync.daemon.cli import _parser, main
from commsync.daemon.store import Store

from records import T0, email_record
from seed import ALICE, seed
from sinks import Shared


class Run:
    """Parse argv with the real parser and run the command's action on a shared store."""

    def __init__(self, store, **config):
        self.store = store
        self.settings = settings_from_dict({"mongodb": {"uri": "memory://"}, **config})
        self.answers = []
        self.prompts = []

    def confirm(self, prompt):
        self.prompts.append(prompt)
        return self.answers.pop(0) if self.answers else False

    async def __call__(self, *argv):
        args = _parser().parse_args([*argv, "-c", "unused.yaml"])
        out, err = io.StringIO(), io.StringIO()
        code = await args.action(self.store, self.settings, args, admin_cli.Console(out=out, err=err, confirm=self.confirm))
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def run(store):
    await seed(store)
    return Run(store)


async def test_records_list_table(run):
    code, out, _ = await run("records", "list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 8
    assert lines[0].split() == ["WHEN", "(UTC)", "CHANNEL", "DIR", "WITH", "CUSTOMERS", "SUBJECT", "ID"]
    assert lines[1].startswith("2025-03-01 15:00  sms") and lines[1].endswith("SM0001")
    assert "alice@example.com +1" in out and "c-alice,c-bob" in out and "Meeting on Friday" in out
    assert lines[-1].endswith("e1@x")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--customer", "c-alice"], ["e4@x", "e2@x", "e1@x"]),
        (["--channel", "sms"], ["SM0001"]),
        (["--direction", "outbound"], ["e2@x"]),
        (["--since", "2025-03-01T11:00", "--until", "2025-03-01T13:00"], ["e4@x", "e3@x"]),
        (["--participant", "+1 415 555 0100"], ["SM0001", "CA0001"]),
        (["--participant", "Alice@Example.com", "--channel", "email"], ["e4@x", "e2@x", "e1@x"]),
        (["--text", "invoice pallets"], ["e3@x"]),
        (["--limit", "2"], ["SM0001", "CA0001"]),
        (["--customer", "nobody"], []),
    ],
)
async def test_records_list_filters_as_json_lines(run, argv, expected):
    code, out, _ = await run("records", "list", "--json", *argv)
    assert code == 0
    assert [json.loads(line)["_id"] for line in out.splitlines()] == expected


async def test_records_list_says_when_nothing_matches(run):
    assert (await run("records", "list", "--text", "zebra"))[1] == "no records match\n"


def test_bad_filter_values_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["records", "list", "--since", "yesterday"])
    assert "not a date" in capsys.readouterr().err


async def test_records_show(run):
    code, out, _ = await run("records", "show", "e4@x")
    doc = json.loads(out)
    assert code == 0 and doc["_id"] == "e4@x" and doc["customer_ids"] == ["c-alice", "c-bob"] and doc["occurred_at"].startswith("2025-03-01T12:00")
    code, out, err = await run("records", "show", "missing@x")
    assert code == 1 and out == "" and "no record 'missing@x'" in err


async def test_history_show(run):
    code, out, _ = await run("history", "show", "c-bob", "--records", "2")
    assert code == 0
    assert out.startswith("customer c-bob (Bob Sample)\n")
    assert '"total": 4' in out and '"talk_seconds": 252' in out
    latest = out.split("latest 2 records:")[1]
    assert "SM0001" in latest and "e3@x" not in latest
    code, out, _ = await run("history", "show", "c-carol")
    assert code == 0 and "no history" in out
    code, out, _ = await run("history", "show", "c-alice", "--json")
    doc = json.loads(out)
    assert doc["customer"]["name"] == "Alice Example" and doc["history"]["total"] == 3 and len(doc["records"]) == 3
    code, _, err = await run("history", "show", "nobody")
    assert code == 1 and "no customer" in err


async def test_records_export_to_stdout_and_files(run, tmp_path):
    code, out, err = await run("records", "export", "--customer", "c-bob")
    assert code == 0 and [json.loads(line)["_id"] for line in out.splitlines()] == ["SM0001", "CA0001", "e4@x", "e3@x"]
    assert "exported 4 records" in err
    target = tmp_path / "bob.csv"
    code, out, _ = await run("records", "export", "--customer", "c-bob", "--format", "csv", "-o", str(target))
    assert code == 0 and out == f"exported 4 records to {target}\n"
    rows = list(csv.DictReader(target.open(encoding="utf-8", newline="")))
    assert [r["id"] for r in rows] == ["SM0001", "CA0001", "e4@x", "e3@x"]
    assert rows[2]["to"] == "sales@ourco.example" and rows[2]["cc"] == "bob@example.org" and rows[2]["customer_ids"] == "c-alice; c-bob"
    assert rows[3]["content"] == "Please find the invoice for the pallets attached."


async def test_records_delete_asks_first(run):
    code, _, err = await run("records", "delete")
    assert code == 2 and "at least one filter" in err
    code, out, _ = await run("records", "delete", "--customer", "c-alice")
    assert code == 1 and out == "3 records of 2 customers match\nnothing deleted\n"
    assert run.prompts == ["delete 3 records for good? [y/N] "]
    assert await run.store.records.count_documents({}) == 7
    run.answers = [True]
    code, out, _ = await run("records", "delete", "--customer", "c-alice")
    assert code == 0 and "deleted 3 records; recomputed the histories of 2 customers" in out
    assert await run.store.history.count_documents({"_id": "c-alice"}) == 0
    assert (await run.store.history.find_one({"_id": "c-bob"}))["total"] == 3
    code, out, _ = await run("records", "delete", "--channel", "sms", "--yes")
    assert code == 0 and "deleted 1 records" in out and len(run.prompts) == 2
    code, out, _ = await run("records", "delete", "--channel", "sms", "--yes")
    assert code == 0 and out == "0 records of 0 customers match\n"


async def test_customers_forget(run):
    code, out, _ = await run("customers", "forget", "c-alice")
    assert code == 1 and "nothing changed" in out
    code, out, _ = await run("customers", "forget", "c-alice", "--yes")
    assert code == 0
    assert "records deleted (no other customer left)    2" in out
    assert "records kept for other customers, unlinked  1" in out
    assert "addresses and numbers newly suppressed      1" in out
    assert "history document deleted                    yes" in out
    assert "left in place" in out
    assert await run.store.records.count_documents({"customer_ids": "c-alice"}) == 0
    result = await run.store.write_batch([email_record("after@x", ALICE)])
    assert dict(result.not_captured) == {"suppressed": 1}


async def test_customers_import(run, tmp_path):
    path = tmp_path / "crm.csv"
    path.write_text("id,name,emails,phones\nc-new,New Co,stranger@nowhere.example,\nc-x,Broken,not-an-email,\n", encoding="utf-8")
    code, out, err = await run("customers", "import", str(path))
    assert code == 1
    assert out == f"imported {path}: 1 new and 0 updated customers, 1 rows rejected; re-linked 1 records\n"
    assert f"{path}:3: 'not-an-email' is not an email address" in err
    jsonl = tmp_path / "crm.jsonl"
    jsonl.write_text('{"id": "c-new", "name": "New Co Ltd", "emails": ["stranger@nowhere.example"]}\n', encoding="utf-8")
    assert (await run("customers", "import", str(jsonl)))[0] == 0
    assert (await run.store.customers.find_one({"_id": "c-new"}))["name"] == "New Co Ltd"
    assert (await run("customers", "import", str(tmp_path / "missing.csv")))[0] == 2


async def test_purge(store):
    run = Run(store, retention={"days": 30})
    await seed(store)  # all in March 2025: older than 30 days
    code, out, _ = await run("purge", "--dry-run")
    assert code == 0 and out.startswith("would delete 7 records older than 30 days")
    code, out, _ = await run("purge")
    assert code == 0 and out == "purged 7 records older than 30 days; histories of 2 customers recomputed\n"
    assert await store.history.count_documents({}) == 0
    code, _, err = await Run(store)("purge")
    assert code == 2 and "retention.days is not set" in err


async def test_rematch_and_init_db(run):
    await run.store.customers.update_one({"_id": "c-carol"}, {"$push": {"emails": "stranger@nowhere.example"}})
    code, out, _ = await run("rematch", "--customer", "c-carol")
    assert code == 0 and out == "examined 1 records; re-linked 1; recomputed the histories of 1 customers\n"
    code, out, _ = await run("rematch")
    assert code == 0 and out.startswith("examined 7 records; re-linked 0")
    code, out, _ = await run("init-db")
    if run.store.memory:
        assert code == 0 and "validators: skipped (memory:// does not enforce them)" in out
        return
    assert code == 0 and "validators: installed on records and customer_history" in out
    # Twice: the collections exist now, so the validators go on through collMod.
    code, again, _ = await run("init-db")
    assert code == 0 and again == out
    infos = {c["name"]: c["options"] async for c in await run.store.db.list_collections()}
    assert infos["records"]["validator"]["$jsonSchema"]["title"] == "commsync record"
    assert infos["records"]["validationLevel"] == "moderate"


def test_main_runs_a_command_with_an_injected_store(db_config, tmp_path, capsys, monkeypatch):
    """The real entry point: config file, store factory, handler, exit code."""
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"mongodb": db_config, "log_level": "warning"}))
    store = Store.connect(db_config["uri"], db_config["database"])

    import asyncio

    async def seeded():
        # A fresh store bound to this test's own event loops: main() runs asyncio.run per command.
        await store.write_batch([email_record("m1@x", ALICE, at=T0)])

    asyncio.run(seeded())
    if store.memory:
        # mongomock keeps its data in the client: every command must see this one.
        monkeypatch.setattr(app, "open_store", lambda settings: Shared(store))
    else:
        store.close()  # each command opens the configured server itself
    assert main(["records", "list", "--json", "-c", str(config)]) == 0
    assert [json.loads(line)["_id"] for line in capsys.readouterr().out.splitlines()] == ["m1@x"]
    assert main(["records", "delete", "--text", "m1", "--yes", "-c", str(config)]) == 0
    assert "deleted 1 records" in capsys.readouterr().out
    assert main(["records", "show", "m1@x", "-c", str(config)]) == 1
