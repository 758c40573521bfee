"""Whatever the input, a normalized email record fits in a MongoDB document (16 MiB) with room to spare.

Every field that grows with the input is capped, and a flag says what was cut
(issue 13 item 12: 260,000 recipients or an 18 MB Subject made records that
pymongo or the server refused).
"""

from __future__ import annotations

import base64
import random

import bson
import pytest

from commsync.connectors.mail import normalize_email

# The documented worst case is about 7.2 MiB (connectors/mail.py); the server's limit is 16 MiB.
BOUND = 8 * 1024 * 1024
FLAGS = ("content_truncated", "subject_truncated", "participants_truncated", "references_truncated", "attachments_truncated")

HEAD = "Message-ID: <caps@x.example>\r\nDate: Tue, 04 Mar 2025 10:00:00 +0000\r\n"


def encoded_size(record: dict) -> int:
    return len(bson.encode(record))


def raw_message(headers: list[str], body: bytes = b"Hello.\r\n") -> bytes:
    return (HEAD + "".join(h + "\r\n" for h in headers) + "\r\n").encode("utf-8") + body


def cut(record: dict) -> set[str]:
    return {flag for flag in FLAGS if record[flag]}


def test_an_ordinary_message_is_not_flagged() -> None:
    record = normalize_email(raw_message(["From: Ann <ann@example.org>", "To: b@example.com", "Subject: Hi", "References: <r@x>"]))
    assert cut(record) == set()


def test_260000_recipients() -> None:
    to = ", ".join(f"Customer {i} <c{i}@example.com>" for i in range(260_000))
    record = normalize_email(raw_message(["From: Ann <ann@example.org>", f"To: {to}"]))
    assert encoded_size(record) < BOUND
    assert cut(record) == {"participants_truncated"}
    assert record["participants"][0]["address"] == "ann@example.org"
    assert record["participants"][1] == {"role": "to", "address": "c0@example.com", "name": "Customer 0", "internal": False}


def test_an_18_mb_subject() -> None:
    subject = "Quote " + "x" * (18 * 1024 * 1024)
    record = normalize_email(raw_message(["From: a@example.org", f"Subject: {subject}"]))
    assert encoded_size(record) < BOUND
    assert cut(record) == {"subject_truncated"}
    assert record["subject"].startswith("Quote xxx") and len(record["subject"]) < 10_000


def test_a_long_subject_of_encoded_words_is_cut_after_decoding() -> None:
    word = "=?utf-8?B?" + base64.b64encode("Grüße ".encode()).decode() + "?="
    record = normalize_email(raw_message([f"Subject: {' '.join([word] * 3000)}"]))
    assert record["subject_truncated"] and record["subject"].startswith("Grüße Grüße")


def test_huge_names_addresses_and_ids_are_cut_or_dropped() -> None:
    record = normalize_email(
        raw_message(
            [
                f"From: {'N' * 5_000_000} <ann@example.org>",
                f"To: {'l' * 5_000_000}@example.com, bob@example.com",
                f"In-Reply-To: <{'i' * 5_000_000}@x>",
                f"References: <{'r' * 5_000_000}@x> <ok@x>",
            ]
        )
    )
    assert encoded_size(record) < 100_000
    assert [p["address"] for p in record["participants"]] == ["ann@example.org", "bob@example.com"]
    assert len(record["participants"][0]["name"]) <= 1000
    assert record["participants_truncated"] is True
    assert record["in_reply_to"] is None and record["references"] == ["ok@x"]


def test_many_references_keep_the_root_and_the_latest() -> None:
    refs = " ".join(f"<m{i}@x.example>" for i in range(200_000))
    record = normalize_email(raw_message([f"References: {refs}", "In-Reply-To: <m199999@x.example>"]))
    assert encoded_size(record) < BOUND
    assert cut(record) == {"references_truncated"}
    assert record["references"][0] == record["thread_id"] == "m0@x.example"
    assert record["references"][-1] == "m199999@x.example"
    assert len(record["references"]) == 100


def test_many_attachments_and_huge_attachment_metadata() -> None:
    parts = [
        f'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="f{i}.pdf"\r\n\r\nx\r\n' for i in range(20_000)
    ]
    parts.append(f'--b\r\nContent-Type: application/{"z" * 3_000_000}\r\nContent-Disposition: attachment; filename="{"n" * 3_000_000}"\r\n\r\nx\r\n')
    body = ("--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n" + "".join(parts) + "--b--\r\n").encode()
    record = normalize_email(raw_message(['Content-Type: multipart/mixed; boundary="b"'], body))
    assert encoded_size(record) < BOUND
    assert cut(record) == {"attachments_truncated"}
    assert record["content"] == "See attached."
    assert record["attachments"][0] == {"filename": "f0.pdf", "content_type": "application/pdf", "size": 1}


def test_one_huge_attachment_name_is_cut() -> None:
    body = (
        "--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f'--b\r\nContent-Type: application/{"z" * 1_000_000}\r\nContent-Disposition: attachment; filename="{"n" * 1_000_000}.pdf"\r\n\r\nx\r\n'
        "--b--\r\n"
    ).encode()
    record = normalize_email(raw_message(['Content-Type: multipart/mixed; boundary="b"'], body))
    assert cut(record) == {"attachments_truncated"}
    (attachment,) = record["attachments"]
    assert attachment["filename"].startswith("nnn") and len(attachment["filename"]) <= 255
    assert attachment["content_type"].startswith("application/zzz") and len(attachment["content_type"]) <= 255


def test_content_has_a_hard_ceiling_whatever_the_configured_cap() -> None:
    body = ("\U0001f600" * 1000 + "\r\n").encode() * 3000  # 3 M four-byte characters
    record = normalize_email(raw_message(["Content-Type: text/plain; charset=utf-8"], body), max_content_chars=10**9)
    assert encoded_size(record) < BOUND
    assert cut(record) == {"content_truncated"}


def test_the_documented_worst_case() -> None:
    """Every capped field at its cap, every character four bytes of UTF-8: still under the bound."""
    wide = "\U0001f600"
    to = ", ".join(f'"{wide * 300}" <{wide * 240}{i:04}@x.io>' for i in range(1100))
    refs = " ".join(f"<{wide * 990}{i:03}@x>" for i in range(150))
    parts = "".join(
        f'--b\r\nContent-Type: application/{wide * 300}\r\nContent-Disposition: attachment; filename="{wide * 300}{i}"\r\n\r\nx\r\n'
        for i in range(600)
    )
    body = f"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{wide * 1_100_000}\r\n{parts}--b--\r\n".encode()
    headers = [f"To: {to}", f"Subject: {wide * 3000}", f"References: {refs}", 'Content-Type: multipart/mixed; boundary="b"']
    record = normalize_email(raw_message(headers, body), max_content_chars=10**9)
    assert cut(record) == set(FLAGS)
    assert (len(record["participants"]), len(record["references"]), len(record["attachments"])) == (1000, 100, 500)
    assert 6 * 1024 * 1024 < encoded_size(record) < BOUND


def _random_header_value(rng: random.Random, size: int) -> str:
    pieces = []
    total = 0
    while total < size:
        kind = rng.random()
        if kind < 0.3:
            piece = f"{rng.choice(['Ann', 'Bö', '李', 'x' * rng.randint(1, 5000)])} <u{rng.randrange(10**6)}@d{rng.randrange(99)}.example>"
        elif kind < 0.5:
            piece = f"u{rng.randrange(10**6)}@example.com"
        elif kind < 0.6:
            piece = "=?utf-8?B?" + base64.b64encode(("Ü" * rng.randint(1, 2000)).encode()).decode() + "?="
        elif kind < 0.7:
            piece = f"<id{rng.randrange(10**9)}@{'h' * rng.randint(1, 1200)}.example>"
        elif kind < 0.8:
            piece = "\U0001f600" * rng.randint(1, 3000)
        else:
            piece = rng.choice(["Re:", "(comment)", '"quoted, name"', "group:", ";", "\r\n\t", ",", "@", "<", ">"])
        pieces.append(piece)
        total += len(piece)
    return " ".join(pieces)


@pytest.mark.parametrize("seed", range(5))
def test_any_input_encodes_well_under_the_document_limit(seed: int) -> None:
    """Property: random huge, many-valued headers and parts never make an oversized record."""
    rng = random.Random(seed)
    names = ["From", "To", "Cc", "Bcc", "Reply-To", "Sender", "Subject", "References", "In-Reply-To", "Message-ID", "List-Id"]
    headers = []
    for _ in range(rng.randint(5, 40)):
        name = rng.choice(names)
        headers.append(f"{name}: {_random_header_value(rng, rng.choice([100, 10_000, 300_000, 1_000_000]))}")
    parts = []
    for i in range(rng.randint(0, 1500)):
        name = _random_header_value(rng, rng.choice([5, 50, 20_000]))
        ctype = rng.choice(["text/plain", "text/html", "application/pdf", "image/png", "application/" + "q" * rng.randint(1, 20_000)])
        parts.append(f'--b\r\nContent-Type: {ctype}; name="{i}"\r\nContent-Disposition: attachment; filename="{name}"\r\n\r\nx\r\n')
    text = _random_header_value(rng, rng.choice([1_000, 3_000_000]))
    body = (f"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n" + "".join(parts) + "--b--\r\n").encode("utf-8", "strict")
    headers.append('Content-Type: multipart/mixed; boundary="b"')
    record = normalize_email(raw_message(headers, body), max_content_chars=rng.choice([100_000, 10**9]))
    assert encoded_size(record) < BOUND
    assert len(record["participants"]) <= 1000 and len(record["attachments"]) <= 500 and len(record["references"]) <= 100
