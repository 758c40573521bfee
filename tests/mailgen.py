"""Generate realistic test messages as bytes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

WORDS = ["quote", "invoice", "delivery", "pallet", "order", "thanks", "regards", "meeting", "schedule", "contract", "renewal", "pricing", "support", "ticket", "issue", "resolved", "shipment", "warehouse", "update", "please", "confirm", "attached", "tomorrow"]


def message(
    n: int,
    *,
    sender: str = "alice@example.com",
    to: str = "sales@ourco.example",
    subject: str | None = None,
    message_id: str | None = None,
    date: datetime | None = None,
    in_reply_to: str | None = None,
    html: bool = False,
    attachment: bytes | None = None,
    seed: int | None = None,
) -> bytes:
    """A plausible business email; deterministic for a given ``n`` and ``seed``."""
    rng = random.Random(n if seed is None else seed)
    msg = EmailMessage()
    msg["From"] = f"Sender {n} <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject or f"Order {1000 + n}: " + " ".join(rng.choices(WORDS, k=4))
    msg["Date"] = format_datetime(date or datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=n))
    msg["Message-ID"] = message_id or f"<msg-{n}-{rng.randrange(10**9)}@mail.example.com>"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    body = "\n\n".join(" ".join(rng.choices(WORDS, k=rng.randint(20, 60))).capitalize() + "." for _ in range(rng.randint(2, 6)))
    msg.set_content(f"Hello,\n\n{body}\n\nBest regards,\nSender {n}\n")
    if html:
        msg.add_alternative(f"<html><body><p>Hello,</p><p>{body}</p><p>Best regards</p></body></html>", subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename=f"invoice-{n}.pdf")
    return msg.as_bytes()
