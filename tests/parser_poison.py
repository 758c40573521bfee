"""Worker-side test hook: make the parser process die on a marked message, as the OOM killer would."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from commsync.connectors import mailpool


def _install(marker: bytes) -> None:
    real = mailpool.normalize_email

    def dying(raw, **kwargs):
        if marker in raw:
            os._exit(137)
        return real(raw, **kwargs)

    mailpool.normalize_email = dying


class PoisonedPool(mailpool.ParsePool):
    """A ParsePool whose workers die on any message containing ``marker``."""

    def __init__(self, workers: int, marker: bytes):
        self.marker = marker
        super().__init__(workers)

    def _start(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_install, initargs=(self.marker,))
