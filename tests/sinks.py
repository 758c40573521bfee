"""Store helpers for tests: a sink that remembers each batch, one that dies mid-run, a store shared by CLI commands."""

from __future__ import annotations

from commsync.daemon.runner import StoreSink


class CountingSink(StoreSink):
    """Remembers what each batch carried, to prove what was fetched.

    ``batches`` holds one ``(source, stream, n_records, left_out)`` per batch, where
    ``left_out`` counts items skipped with a reason plus those handed on for quarantine.
    """

    def __init__(self, store):
        super().__init__(store)
        self.batches = []

    async def write(self, source, batch):
        self.batches.append((source, batch.stream, len(batch.records), batch.skipped + len(batch.malformed)))
        await super().write(source, batch)


class CrashingSink(CountingSink):
    """Stores every batch but saves only the first ``after`` checkpoints.

    The next ``save_checkpoint`` raises, as if the process died after a batch
    was stored and before its checkpoint was.
    """

    def __init__(self, store, after: int = 1):
        super().__init__(store)
        self.after = after
        self.saved = 0

    async def save_checkpoint(self, source, stream, checkpoint):
        if self.saved == self.after:
            raise RuntimeError("injected: died after storing, before the checkpoint")
        self.saved += 1
        await super().save_checkpoint(source, stream, checkpoint)


class Shared:
    """One store for every command of a test (mongomock keeps its data in the client)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return getattr(self.store, name)

    def close(self):
        pass
