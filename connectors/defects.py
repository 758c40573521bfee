"""What went wrong while normalizing one message: the record's ``parse_defects``."""

from __future__ import annotations

MAX_DEFECTS = 20


class Defects:
    """Ordered, deduplicated, capped list of short problem descriptions."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        if text not in self.items and len(self.items) < MAX_DEFECTS:
            self.items.append(text)
