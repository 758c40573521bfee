"""Tests for commsync.connectors.mail (pure email normalization)."""

from __future__ import annotations

import base64
import csv
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from commsync.connectors.mail import extract_ids, normalize_email, normalize_message_id

from seed import CORPUS, CORPUS_FILES

RECORD_KEYS = {
    "_id",
    "channel",
    "direction",
    "occurred_at",
    "participants",
    "subject",
    "content",
    "content_truncated",
    "message_id",
    "in_reply_to",
    "references",
    "thread_id",
    "attachments",
    "size",
    "parse_defects",
    "automated",
    "automated_by",
    "subject_truncated",
    "participants_truncated",
    "references_truncated",
    "attachments_truncated",
}

OWN = frozenset({"Sales@OurCo.example"})
INTERNAL = frozenset({"ourco.example"})
RECEIVED = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)


def build(
    headers: dict[str, str] | list[tuple[str, str]],
    body: str | bytes = "Hello.\n",
    eol: str = "\r\n",
) -> bytes:
    """A raw message from headers and a body, with the given line endings."""
    items = headers.items() if isinstance(headers, dict) else headers
    head = "".join(f"{name}: {value}\n" for name, value in items)
    text = body if isinstance(body, bytes) else body.encode("utf-8")
    raw = head.encode("utf-8") + b"\n" + text
    return raw.replace(b"\r\n", b"\n").replace(b"\n", eol.encode())


def simple(**overrides: str | None) -> dict[str, str]:
    """Headers of a plain-text message; Some_Name=value sets Some-Name, None removes it."""
    headers = {
        "From": "Maria Lopez <maria.lopez@example.com>",
        "To": "Sales <sales@ourco.example>",
        "Subject": "Quote request",
        "Date": "Tue, 04 Mar 2025 10:00:00 +0000",
        "Message-ID": "<abc123@Mail.Example.COM>",
        "Content-Type": "text/plain; charset=utf-8",
    }
    for key, value in overrides.items():
        name = key.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def alternative(
    plain: str | None, html: str | None, extra_parts: str = ""
) -> tuple[dict[str, str], str]:
    """Headers and body of a multipart/mixed message: plain, html, then ``extra_parts``."""
    parts = []
    if plain is not None:
        parts.append(f"--B1\nContent-Type: text/plain; charset=utf-8\n\n{plain}\n")
    if html is not None:
        parts.append(f"--B1\nContent-Type: text/html; charset=utf-8\n\n{html}\n")
    body = "".join(parts) + extra_parts + "--B1--\n"
    return simple(Content_Type='multipart/mixed; boundary="B1"', MIME_Version="1.0"), body


# --------------------------------------------------------------------------- record shape


def test_all_keys_present_and_basic_fields() -> None:
    record = normalize_email(build(simple()), own_addresses=OWN, internal_domains=INTERNAL)
    assert set(record) == RECORD_KEYS
    assert record["channel"] == "email"
    assert record["subject"] == "Quote request"
    assert record["content"] == "Hello."
    assert record["size"] == len(build(simple()))
    assert record["parse_defects"] == []


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00" * 100,
        b"\r\r\r\n\n",
        b"garbage without any header",
        b":" * 5000,
        b"Subject: =?utf-8?B?####?=\n\n",
        b"Content-Type: multipart/mixed\n\nno boundary",
        b"Content-Type: multipart/mixed; boundary=x\n\n"
        + b"--x\nContent-Type: multipart/mixed; boundary=x\n\n" * 500,
        bytes(range(256)) * 20,
    ],
)
def test_never_raises_on_garbage(raw: bytes) -> None:
    record = normalize_email(raw)
    assert set(record) == RECORD_KEYS
    assert record["_id"]
    assert record["occurred_at"].tzinfo is not None
    assert isinstance(record["content"], str)


def test_non_bytes_input_does_not_raise() -> None:
    record = normalize_email(None)  # type: ignore[arg-type]
    assert set(record) == RECORD_KEYS
    assert "input:not-bytes" in record["parse_defects"]


def test_plain_sets_for_own_addresses_are_accepted() -> None:
    own = {"SALES@ourco.example"}
    record = normalize_email(build(simple(From="sales@ourco.example")), own_addresses=own)  # type: ignore[arg-type]
    assert record["direction"] == "outbound"


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        ("=?utf-8?B?QW5nZWJvdCBmw7xyIE3DvGxsZXI=?=", "Angebot für Müller"),
        ("=?UTF-8?Q?Angebot_f=C3=BCr_M=C3=BCller?=", "Angebot für Müller"),
        ("=?iso-8859-1?Q?Pr=E9sentation_du_devis?=", "Présentation du devis"),
        ("Re: =?utf-8?Q?caf=C3=A9?= =?utf-8?Q?_cr=C3=A8me?= today", "Re: café crème today"),
        # A multi-byte character split across two encoded words.
        ("=?utf-8?B?w6k=?= =?utf-8?B?w6k=?=", "éé"),
        ("=?utf-8?B?ww==?=\r\n =?utf-8?B?qQ==?=", "é"),
        ("=?x-unknown?Q?caf=E9?=", "café"),
    ],
)
def test_rfc2047_subjects(encoded: str, expected: str) -> None:
    record = normalize_email(build(simple(Subject=encoded)))
    assert record["subject"] == expected


def test_folded_subject_is_unfolded() -> None:
    record = normalize_email(build(simple(Subject="A long\r\n\tsubject   line")))
    assert record["subject"] == "A long subject line"


def test_missing_subject_is_none() -> None:
    assert normalize_email(build(simple(Subject=None)))["subject"] is None


@pytest.mark.parametrize(
    ("from_header", "name"),
    [
        ("=?utf-8?B?SsO8cmdlbiBNw7xsbGVy?= <j.mueller@example.org>", "Jürgen Müller"),
        ("=?utf-8?Q?J=C3=BCrgen_M=C3=BCller?= <j.mueller@example.org>", "Jürgen Müller"),
        ("=?iso-8859-1?Q?J=FCrgen_M=FCller?= <j.mueller@example.org>", "Jürgen Müller"),
        ('"=?utf-8?Q?M=C3=BCller=2C_J=C3=BCrgen?=" <j.mueller@example.org>', "Müller, Jürgen"),
        ('"Müller, Jürgen" <j.mueller@example.org>', "Müller, Jürgen"),
    ],
)
def test_rfc2047_and_8bit_display_names(from_header: str, name: str) -> None:
    record = normalize_email(build(simple(From=from_header)))
    sender = record["participants"][0]
    assert sender == {
        "role": "from",
        "address": "j.mueller@example.org",
        "name": name,
        "internal": False,
    }


def test_raw_latin1_header_bytes_fall_back_to_latin1() -> None:
    raw = build(simple(Subject="@@")).replace(b"@@", "Prix spécial".encode("latin-1"))
    assert normalize_email(raw)["subject"] == "Prix spécial"


def test_participants_roles_order_dedup_and_internal_flag() -> None:
    headers = [
        ("From", "Maria Lopez <Maria.Lopez@Example.com>"),
        ("Sender", "assistant@example.com"),
        ("Reply-To", "support@example.com"),
        ("To", "Sales <SALES@ourco.example>, bob@ourco.example, sales@ourco.example"),
        ("Cc", "undisclosed-recipients:;, ann@example.org"),
        ("Bcc", "archive@ourco.example"),
        ("Subject", "x"),
        ("Date", "Tue, 04 Mar 2025 10:00:00 +0000"),
    ]
    record = normalize_email(build(headers), own_addresses=OWN, internal_domains=INTERNAL)
    summary = [(p["role"], p["address"], p["name"], p["internal"]) for p in record["participants"]]
    assert summary == [
        ("from", "maria.lopez@example.com", "Maria Lopez", False),
        ("sender", "assistant@example.com", None, False),
        ("reply_to", "support@example.com", None, False),
        ("to", "sales@ourco.example", "Sales", True),
        ("to", "bob@ourco.example", None, True),
        ("cc", "ann@example.org", None, False),
        ("bcc", "archive@ourco.example", None, True),
    ]
    assert record["direction"] == "inbound"


def test_space_separated_address_list_is_recovered() -> None:
    record = normalize_email(build(simple(To="tim@example.com concierge@example.com")))
    to = [p["address"] for p in record["participants"] if p["role"] == "to"]
    assert to == ["tim@example.com", "concierge@example.com"]


@pytest.mark.parametrize(
    ("sender", "own", "domains", "direction"),
    [
        ("Sales <SALES@OURCO.example>", OWN, frozenset(), "outbound"),
        ("bob@ourco.example", frozenset(), INTERNAL, "outbound"),
        ("bob@OurCo.Example", frozenset(), frozenset({"OURCO.EXAMPLE"}), "outbound"),
        ("bob@mail.ourco.example", frozenset(), INTERNAL, "inbound"),  # exact domain only
        ("maria@example.com", OWN, INTERNAL, "inbound"),
    ],
)
def test_direction(
    sender: str, own: frozenset[str], domains: frozenset[str], direction: str
) -> None:
    raw = build(simple(From=sender))
    record = normalize_email(raw, own_addresses=own, internal_domains=domains)
    assert record["direction"] == direction
    assert record["participants"][0]["internal"] is (direction == "outbound")


def test_missing_from_is_inbound() -> None:
    record = normalize_email(build(simple(From=None)), own_addresses=OWN, internal_domains=INTERNAL)
    assert record["direction"] == "inbound"


# --------------------------------------------------------------------------- dates


def test_date_with_offset_is_converted_to_utc() -> None:
    record = normalize_email(build(simple(Date="Tue, 04 Mar 2025 10:00:00 +0200")))
    assert record["occurred_at"] == datetime(2025, 3, 4, 8, 0, tzinfo=UTC)
    assert record["occurred_at"].utcoffset() == timedelta(0)


def test_minus_0000_date_is_utc() -> None:
    record = normalize_email(build(simple(Date="Tue, 04 Mar 2025 10:00:00 -0000")))
    assert record["occurred_at"] == datetime(2025, 3, 4, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("date", "defect"),
    [
        (None, "date:missing"),
        ("", "date:missing"),
        ("sometime last week", "date:unparseable"),
        ("Thu, 01 Jan 1970 00:00:00 +0000", "date:out-of-range"),
        ("Mon, 01 Jan 2091 00:00:00 +0000", "date:out-of-range"),
    ],
)
def test_bad_date_falls_back_to_received_at(date: str | None, defect: str) -> None:
    received = datetime(2025, 3, 4, 7, 6, 7, 123456, tzinfo=timezone(timedelta(hours=2)))
    record = normalize_email(build(simple(Date=date)), received_at=received)
    assert record["occurred_at"] == datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
    assert record["occurred_at"].tzinfo == UTC
    assert defect in record["parse_defects"]


def test_date_far_after_received_at_is_rejected() -> None:
    raw = build(simple(Date="Tue, 01 Apr 2025 10:00:00 +0000"))
    record = normalize_email(raw, received_at=RECEIVED)
    assert record["occurred_at"] == datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)


def test_bad_date_without_received_at_uses_now() -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    record = normalize_email(build(simple(Date="garbage")))
    assert before <= record["occurred_at"] <= datetime.now(UTC)
    assert record["occurred_at"].microsecond % 1000 == 0


# --------------------------------------------------------------------------- ids and threads


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<AbC.123@Mail.Example.COM>", "AbC.123@mail.example.com"),
        ("  <abc@EXAMPLE.com>  ", "abc@example.com"),
        ("<abc\r\n @example.com>", "abc@example.com"),
        ("abc@Example.com", "abc@example.com"),
        ("<abc@x@Example.COM>", "abc@x@example.com"),
        ("<local-only-id>", "local-only-id"),
        ("<>", None),
        ("<@>", None),
        ("   ", None),
        (None, None),
        ("<" + "a" * 2000 + "@example.com>", None),
    ],
)
def test_normalize_message_id(value: str | None, expected: str | None) -> None:
    assert normalize_message_id(value) == expected


def test_extract_ids() -> None:
    ids = extract_ids("<a@X.com> <b@y.com>\r\n <a@x.com>, <c@Z.com>")
    assert ids == ["a@x.com", "b@y.com", "c@z.com"]
    bare = extract_ids("bare@Example.com other@example.com")
    assert bare == ["bare@example.com", "other@example.com"]
    assert extract_ids("") == [] and extract_ids(None) == []


def test_message_id_normalization_in_record() -> None:
    record = normalize_email(build(simple(Message_ID="\r\n <Abc.DEF@Mail.Example.COM>")))
    assert record["_id"] == record["message_id"] == "Abc.DEF@mail.example.com"
    assert record["thread_id"] == record["message_id"]


def test_thread_id_from_references_then_in_reply_to() -> None:
    refs = simple(
        References="<root@Example.com>\r\n <middle@example.com> <root@example.com>",
        In_Reply_To="<middle@example.com>",
    )
    record = normalize_email(build(refs))
    assert record["references"] == ["root@example.com", "middle@example.com"]
    assert record["in_reply_to"] == "middle@example.com"
    assert record["thread_id"] == "root@example.com"

    record = normalize_email(build(simple(In_Reply_To="<parent@Example.com> (sent by Maria)")))
    assert record["references"] == []
    assert record["thread_id"] == record["in_reply_to"] == "parent@example.com"


def test_missing_message_id_gets_deterministic_hash() -> None:
    headers = simple(Message_ID=None, Subject="=?utf-8?Q?Caf=C3=A9?=", Cc="ann@example.org")
    body = "First line.\n\n\n\n\nSecond line.\n"
    crlf = build(headers, body, eol="\r\n")
    lf = build(headers, body, eol="\n")
    other_mailbox = b"Received: from mx.example.net by imap\r\nX-Folder: INBOX\r\n" + crlf
    ids = {normalize_email(raw, received_at=RECEIVED)["_id"] for raw in (crlf, lf, other_mailbox)}
    assert len(ids) == 1
    (record_id,) = ids
    assert record_id.startswith("sha256:") and len(record_id) == len("sha256:") + 64
    record = normalize_email(lf)
    assert record["message_id"] is None and record["thread_id"] == record_id
    assert "message-id:missing" in record["parse_defects"]
    # A different body is a different message.
    assert normalize_email(build(headers, "Other text.\n"))["_id"] != record_id


def test_hash_ignores_recipient_order_and_case() -> None:
    a = simple(Message_ID=None, To="x@example.com, Y@example.com")
    b = simple(Message_ID=None, To="y@example.com, X@EXAMPLE.com")
    assert normalize_email(build(a))["_id"] == normalize_email(build(b))["_id"]


# --------------------------------------------------------------------------- content


def test_text_plain_preferred_over_html() -> None:
    headers, body = alternative("Plain words here.", "<p>HTML words here.</p>")
    record = normalize_email(build(headers, body))
    assert record["content"] == "Plain words here."
    assert record["attachments"] == []


def test_html_only_is_converted_to_text() -> None:
    html = (
        "<html><head><style>p {color: red}</style><title>t</title></head><body>"
        "<h1>Spring&nbsp;newsletter</h1><p>New <b>prices</b> for 2025.</p>"
        "<ul><li>Widgets</li><li>Gadgets</li></ul></body></html>"
    )
    headers, body = alternative(None, html)
    content = normalize_email(build(headers, body))["content"]
    for word in ("Spring", "newsletter", "prices", "2025", "Widgets", "Gadgets"):
        assert word in content
    assert "<" not in content and "color: red" not in content


def test_blank_plain_part_falls_back_to_html() -> None:
    headers, body = alternative("   \n", "<p>Only here</p>")
    assert normalize_email(build(headers, body))["content"] == "Only here"


def test_content_is_normalized() -> None:
    body = b"\xef\xbb\xbfLine one\x00.\r\nLine two.\r\r\r\r\r\rLine three.\r\n\r\n\r\n"
    record = normalize_email(build(simple(), body))
    assert record["content"] == "Line one.\nLine two.\n\n\nLine three."


def test_cr_only_line_endings() -> None:
    record = normalize_email(build(simple(), "a\nb\n", eol="\r"))
    assert record["subject"] == "Quote request"
    assert record["content"] == "a\nb"
    assert record["message_id"] == "abc123@mail.example.com"


def test_content_cap_sets_truncated() -> None:
    body = "word " * 1000
    record = normalize_email(build(simple(), body), max_content_chars=100)
    assert len(record["content"]) == 100
    assert record["content_truncated"] is True
    short = normalize_email(build(simple(), "short"), max_content_chars=100)
    assert short["content_truncated"] is False


def test_huge_body_is_capped() -> None:
    body = ("x" * 79 + "\n") * 200_000  # 16 MB
    record = normalize_email(build(simple(), body), max_content_chars=1000)
    assert len(record["content"]) == 1000 and record["content_truncated"] is True


def test_truncated_fetch_flag() -> None:
    record = normalize_email(build(simple()), truncated_fetch=True)
    assert record["content"] == "Hello." and record["content_truncated"] is True


def test_unknown_charset_does_not_raise() -> None:
    headers = simple(Content_Type="text/plain; charset=x-unknown")
    raw = build(headers, "Envoy\xe9 par Bell".encode("latin-1"))
    record = normalize_email(raw)
    assert record["content"] == "Envoyé par Bell"
    assert "charset:x-unknown" in record["parse_defects"]


def test_lying_charset_falls_back() -> None:
    headers = simple(Content_Type="text/plain; charset=us-ascii")
    raw = build(headers, "Grüße aus München".encode())
    assert normalize_email(raw)["content"] == "Grüße aus München"
    raw = build(simple(Content_Type="text/plain; charset=utf-8"), "Grüße".encode("latin-1"))
    record = normalize_email(raw)
    assert record["content"] == "Grüße" and "charset:mismatch" in record["parse_defects"]


def test_base64_and_quoted_printable_bodies() -> None:
    b64 = base64.b64encode("Prix: 12 €".encode()).decode()
    raw = build(simple(Content_Transfer_Encoding="base64"), b64)
    assert normalize_email(raw)["content"] == "Prix: 12 €"
    headers = simple(
        Content_Type="text/plain; charset=iso-8859-1",
        Content_Transfer_Encoding="quoted-printable",
    )
    raw = build(headers, "Pr=E9sent=\nation")
    assert normalize_email(raw)["content"] == "Présentation"


# --------------------------------------------------------------------------- attachments


def test_attachment_metadata() -> None:
    pdf = bytes(range(256)) * 40  # 10240 bytes
    encoded = base64.encodebytes(pdf).decode()
    parts = (
        "--B1\nContent-Type: application/pdf; name=\"ignored.pdf\"\n"
        "Content-Disposition: attachment; filename=\"Quote 2025-014.pdf\"\n"
        f"Content-Transfer-Encoding: base64\n\n{encoded}\n"
        "--B1\nContent-Type: text/csv; charset=utf-8\n"
        "Content-Disposition: attachment; filename*=utf-8''Pr%C3%A9visions.csv\n\na,b\n1,2\n"
        "--B1\nContent-Type: image/png\nContent-ID: <logo@ourco.example>\n"
        f"Content-Transfer-Encoding: base64\n\n{base64.encodebytes(b'PNG' * 100).decode()}\n"
        "--B1\nContent-Type: application/octet-stream;\n"
        " name=\"=?utf-8?B?w7xiZXJzaWNodC56aXA=?=\"\n\nxyz\n"
    )
    headers, body = alternative("See attached.", "<p>See attached.</p>", parts)
    record = normalize_email(build(headers, body))
    assert record["content"] == "See attached."
    summary = [(a["filename"], a["content_type"]) for a in record["attachments"]]
    assert summary == [
        ("Quote 2025-014.pdf", "application/pdf"),
        ("Prévisions.csv", "text/csv"),
        (None, "image/png"),
        ("übersicht.zip", "application/octet-stream"),
    ]
    sizes = [a["size"] for a in record["attachments"]]
    assert abs(sizes[0] - len(pdf)) <= 4
    assert abs(sizes[2] - 300) <= 4


def test_forwarded_message_is_one_attachment() -> None:
    inner = "From: a@example.com\nSubject: inner\nContent-Type: text/plain\n\nInner body text.\n"
    parts = f"--B1\nContent-Type: message/rfc822\n\n{inner}\n"
    headers, body = alternative("Forwarding this.", None, parts)
    record = normalize_email(build(headers, body))
    assert record["content"] == "Forwarding this."
    assert [a["content_type"] for a in record["attachments"]] == ["message/rfc822"]
    assert record["attachments"][0]["size"] > 40
    # The enclosed message's sender is not a participant of the outer one.
    assert "a@example.com" not in {p["address"] for p in record["participants"]}


def test_text_attachment_is_not_the_body() -> None:
    parts = (
        "--B1\nContent-Type: text/plain\n"
        "Content-Disposition: attachment; filename=notes.txt\n\nnotes\n"
    )
    headers, body = alternative(None, None, parts)
    record = normalize_email(build(headers, body))
    assert record["content"] == ""
    assert record["attachments"] == [
        {"filename": "notes.txt", "content_type": "text/plain", "size": 5}
    ]


# --------------------------------------------------------------------------- MIME structure
# The parser splits bodies on boundary lines without reading them line by line
# (mime.FastParser); these pin what it must get out of awkward structures. The
# defects are the names the stdlib's compat32 parser gives the same structure.

PDF_B64 = base64.encodebytes(bytes(range(256)) * 40).decode()  # 10240 bytes


def mime(content_type: str, body: str, eol: str = "\n") -> bytes:
    return build({**simple(Content_Type=None), "Content-Type": content_type}, body, eol)


def test_boundary_text_inside_lines_does_not_split() -> None:
    raw = mime(
        'multipart/mixed; boundary="AAAA"',
        "--AAAA\nContent-Type: text/plain\n\nHi --AAAA there\n--AAAAx\n --AAAA\n"
        "--AAAA\nContent-Type: application/pdf\nContent-Transfer-Encoding: base64\n"
        f"Content-Disposition: attachment; filename=a.pdf\n\n{PDF_B64}--AAAA--\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "Hi --AAAA there\n--AAAAx\n --AAAA"
    assert record["attachments"] == [{"filename": "a.pdf", "content_type": "application/pdf", "size": 10240}]
    assert record["parse_defects"] == []


def test_boundary_lines_with_transport_padding() -> None:
    raw = mime(
        'multipart/alternative; boundary="b"',
        "--b \t\nContent-Type: text/plain\n\nplain text\n--b\t\nContent-Type: text/html\n\n<p>html</p>\n--b--  \n",
        eol="\r\n",
    )
    record = normalize_email(raw)
    assert (record["content"], record["attachments"], record["parse_defects"]) == ("plain text", [], [])


def test_preamble_and_epilogue_are_not_content() -> None:
    raw = mime(
        "multipart/mixed; boundary=b",
        "This is a multi-part message in MIME format.\n\n--b\nContent-Type: text/plain\n\nbody\n--b--\n\nepilogue text\n",
    )
    record = normalize_email(raw)
    assert (record["content"], record["parse_defects"]) == ("body", [])


def test_missing_close_boundary_keeps_the_parts() -> None:
    raw = mime(
        "multipart/mixed; boundary=b",
        "--b\nContent-Type: text/plain\n\nfirst\n"
        "--b\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\niVBORw0KGgo=\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "first"
    assert record["attachments"] == [{"filename": None, "content_type": "image/png", "size": 8}]
    assert record["parse_defects"] == ["CloseBoundaryNotFoundDefect"]


def test_message_cut_inside_an_attachment() -> None:
    raw = mime(
        "multipart/mixed; boundary=b",
        "--b\nContent-Type: text/plain\n\nsee attached\n--b\nContent-Type: application/pdf\n"
        f"Content-Transfer-Encoding: base64\nContent-Disposition: attachment; filename=cut.pdf\n\n{PDF_B64}",
    )[:-5000]
    record = normalize_email(raw, truncated_fetch=True)
    assert record["content"] == "see attached"
    assert record["attachments"] == [{"filename": "cut.pdf", "content_type": "application/pdf", "size": 6541}]
    assert record["parse_defects"] == ["CloseBoundaryNotFoundDefect"]


def test_close_boundary_before_any_part() -> None:
    raw = mime("multipart/mixed; boundary=b", "preamble text\n--b--\nepilogue\n")
    record = normalize_email(raw)
    assert record["content"] == "preamble text"
    assert record["parse_defects"] == ["StartBoundaryNotFoundDefect", "MultipartInvariantViolationDefect"]


def test_multipart_without_boundary_parameter_is_text() -> None:
    record = normalize_email(mime("multipart/mixed", "--b\n\ntext\n--b--\n"))
    assert record["content"] == "--b\n\ntext\n--b--"
    assert record["parse_defects"] == ["NoBoundaryInMultipartDefect", "MultipartInvariantViolationDefect"]


@pytest.mark.parametrize("eol", ["\r", "mixed"])
def test_multipart_with_cr_or_mixed_line_endings(eol: str) -> None:
    body = (
        "--b\nContent-Type: text/html\n\n<p>html first</p>\n"
        "--b\nContent-Type: text/plain\n\nline one\nline two\n--b--\n"
    )
    if eol == "mixed":
        raw = mime("multipart/alternative; boundary=b", body).replace(b"line one\n", b"line one\r")
        raw = raw.replace(b"--b\nContent-Type: text/plain\n\n", b"--b\r\nContent-Type: text/plain\r\r\n")
    else:
        raw = mime("multipart/alternative; boundary=b", body, eol="\r")
    record = normalize_email(raw)
    assert (record["content"], record["attachments"], record["parse_defects"]) == ("line one\nline two", [], [])


def test_outer_boundary_ends_an_unclosed_inner_multipart() -> None:
    raw = mime(
        "multipart/mixed; boundary=outer",
        "--outer\nContent-Type: multipart/alternative; boundary=outer-inner\n\n"
        "--outer-inner\nContent-Type: text/plain\n\ninner plain\n"
        "--outer\nContent-Type: application/zip\nContent-Disposition: attachment; filename=z.zip\n"
        "Content-Transfer-Encoding: base64\n\nUEsDBA==\n--outer--\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "inner plain"
    assert record["attachments"] == [{"filename": "z.zip", "content_type": "application/zip", "size": 4}]
    assert record["parse_defects"] == ["CloseBoundaryNotFoundDefect"]


def test_inner_multipart_reusing_the_outer_boundary() -> None:
    # The outer multipart claims every "--b" line, so the inner one is empty (a blank
    # text part) and the text part after it belongs to the outer one: that is the body.
    raw = mime(
        "multipart/mixed; boundary=b",
        "--b\nContent-Type: multipart/alternative; boundary=b\n\n--b\nContent-Type: text/plain\n\ninner\n--b--\n--b--\n",
    )
    record = normalize_email(raw)
    assert (record["content"], record["attachments"]) == ("inner", [])
    assert record["parse_defects"] == ["StartBoundaryNotFoundDefect"]


def test_consecutive_boundary_lines_enclose_no_part() -> None:
    raw = mime(
        "multipart/mixed; boundary=b",
        "--b\n--b\nContent-Type: text/plain\n\nafter doubled\n"
        "--b\n--b--\nContent-Type: text/csv\nContent-Disposition: attachment; filename=x.csv\n\na,b\n--b--\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "after doubled"
    assert record["attachments"] == [{"filename": "x.csv", "content_type": "text/csv", "size": 3}]
    assert record["parse_defects"] == []


def test_part_without_headers_is_plain_text() -> None:
    raw = mime("multipart/mixed; boundary=b", "--b\n\nno part headers\n--b\nContent-Type: text/html\n\n<b>x</b>\n--b--\n")
    assert normalize_email(raw)["content"] == "no part headers"


INNER = build(simple(Subject="Inner", Message_ID="<inner@x.example>"), "inner body\n", eol="\n").decode()


def test_delivery_status_and_enclosed_message_are_attachments() -> None:
    raw = mime(
        "multipart/report; report-type=delivery-status; boundary=r",
        "--r\nContent-Type: text/plain\n\nDelivery failed.\n"
        "--r\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mx.example\n\n"
        "Final-Recipient: rfc822; gone@example.com\nAction: failed\n"
        f"--r\nContent-Type: message/rfc822\n\n{INNER}--r--\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "Delivery failed."
    assert record["attachments"] == [
        {"filename": None, "content_type": "message/delivery-status", "size": 92},
        {"filename": None, "content_type": "message/rfc822", "size": 211},
    ]
    assert record["subject"] == "Quote request" and record["parse_defects"] == []


def test_digest_parts_default_to_enclosed_messages() -> None:
    raw = mime(
        "multipart/digest; boundary=d",
        f"--d\n\n{INNER}--d\nContent-Type: text/plain\n\ndigest text\n--d--\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "digest text"
    assert record["attachments"] == [{"filename": None, "content_type": "message/rfc822", "size": 211}]


def test_envelope_line_ending_the_header_block_starts_the_body() -> None:
    record = normalize_email(b"Subject: s\nMessage-ID: <f@x.example>\nFrom someone\n\nbody\n", received_at=RECEIVED)
    assert (record["subject"], record["content"]) == ("s", "From someone\nbody")
    assert record["parse_defects"] == ["date:missing"]


# --------------------------------------------------------------------------- corpus


NO_CORPUS = pytest.mark.skip(reason=f"email corpus not found at {CORPUS} (set COMMSYNC_CORPUS_DIR)")


def _manifest() -> dict[str, dict[str, str]]:
    path = CORPUS / "MANIFEST.tsv"
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle, delimiter="\t")}


MANIFEST = _manifest()


def _corpus_params() -> list:
    if not CORPUS_FILES:
        return [pytest.param(None, marks=NO_CORPUS, id="no-corpus")]
    return [pytest.param(path, id=path.name) for path in CORPUS_FILES]


def _check_record(record: dict, raw: bytes) -> None:
    assert set(record) == RECORD_KEYS
    assert isinstance(record["_id"], str) and record["_id"]
    assert record["channel"] == "email"
    assert record["direction"] in ("inbound", "outbound")
    occurred = record["occurred_at"]
    assert isinstance(occurred, datetime) and occurred.utcoffset() == timedelta(0)
    assert occurred.microsecond % 1000 == 0
    assert isinstance(record["content"], str)
    assert "\x00" not in record["content"] and "\r" not in record["content"]
    assert isinstance(record["content_truncated"], bool)
    assert record["subject"] is None or isinstance(record["subject"], str)
    for participant in record["participants"]:
        assert participant["role"] in ("from", "sender", "reply_to", "to", "cc", "bcc")
        assert "@" in participant["address"]
        assert participant["address"] == participant["address"].lower()
        assert participant["name"] is None or isinstance(participant["name"], str)
        assert isinstance(participant["internal"], bool)
    for key in ("message_id", "in_reply_to"):
        assert record[key] is None or isinstance(record[key], str)
    assert all(isinstance(ref, str) and ref for ref in record["references"])
    assert isinstance(record["thread_id"], str) and record["thread_id"]
    for attachment in record["attachments"]:
        assert attachment["filename"] is None or isinstance(attachment["filename"], str)
        assert attachment["content_type"] == attachment["content_type"].lower()
        assert isinstance(attachment["size"], int) and attachment["size"] >= 0
    assert record["size"] == len(raw)
    assert all(isinstance(d, str) for d in record["parse_defects"])
    assert len(record["parse_defects"]) <= 20


@pytest.mark.parametrize("path", _corpus_params())
def test_corpus_file_normalizes(path: Path) -> None:
    raw = path.read_bytes()
    own = frozenset({"test@example.com"})
    record = normalize_email(raw, own_addresses=own, received_at=RECEIVED)
    _check_record(record, raw)
    features = MANIFEST.get(path.name, {}).get("features", "")
    if "py-errors=get_content:LookupError" in features:
        # The stdlib's get_content() raises on these unknown charsets; we must still read the text.
        assert record["content"].strip()
        assert any(d.startswith("charset:") for d in record["parse_defects"])
    if "no Date" in features:
        assert record["occurred_at"] == datetime(2025, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)


@pytest.mark.parametrize("path", _corpus_params())
def test_corpus_id_is_stable_across_line_endings(path: Path) -> None:
    raw = path.read_bytes()
    lf = raw.replace(b"\r\n", b"\n")
    crlf = lf.replace(b"\n", b"\r\n")
    assert normalize_email(raw)["_id"] == normalize_email(lf)["_id"] == normalize_email(crlf)["_id"]


# Notable corpus files (see the notes in MANIFEST.tsv) and what we must get out of them.


def _x_unknown_charset(r: dict) -> None:
    assert "Test test. Hi. Waving." in r["content"]
    assert "charset:x-unknown" in r["parse_defects"]


def _bad_charset_name(r: dict) -> None:
    assert "M\u00e4tterhorn" in r["content"]  # the 8-bit byte is windows-1252
    assert "charset:bad-charset" in r["parse_defects"]


def _utf8_declared_as_windows_1252(r: dict) -> None:
    assert "Thunderbird" in r["content"] and "\u30e1\u30fc\u30eb" in r["content"]


def _no_charset_8bit_body(r: dict) -> None:
    assert "espa\u00f1ol" in r["content"]


def _cr_only_line_endings(r: dict) -> None:
    assert r["message_id"] == "DSNmDLeZEmP008628@neko1.example.com"
    assert r["content"].count("\n") > 3


def _unparseable_date(r: dict) -> None:
    assert "date:unparseable" in r["parse_defects"]


def _8bit_from_name(r: dict) -> None:
    assert r["participants"][0]["name"] == "Ingo L\u00fctkebohle"


def _rfc6532_utf8_headers(r: dict) -> None:
    assert r["subject"] == "S\u00e4ying Hello"
    assert r["participants"][0]["name"] == "J\u00f6hn Doe"


def _space_separated_addresses(r: dict) -> None:
    addresses = {p["address"] for p in r["participants"]}
    assert {"tim@powerupdev.com", "concierge@powerupdev.com"} <= addresses


def _empty_group_lists(r: dict) -> None:
    assert r["participants"] and all("@" in p["address"] for p in r["participants"])


def _huge_header_block(r: dict) -> None:
    assert r["subject"].startswith("Die hei\u00dfe Zypernsonne")


def _gif_attachment(r: dict) -> None:
    assert [(a["filename"], a["content_type"]) for a in r["attachments"]] == [
        ("dingusfish.gif", "image/gif")
    ]
    assert 3400 < r["attachments"][0]["size"] < 3600  # estimated without decoding


def _japanese_rfc2231_filename(r: dict) -> None:
    name = r["attachments"][0]["filename"]
    assert name.startswith("\u304b\u304d\u304f\u3051\u3053") and name.endswith(".txt")


def _iso_2022_jp(r: dict) -> None:
    assert r["subject"] == "\u307e\u307f\u3080\u3081\u3082"
    assert r["content"] and "\ufffd" not in r["content"]


def _references_with_invalid_id(r: dict) -> None:
    assert r["references"][:2] == ["foo@bar.net", "baz@bar.net"]
    assert r["thread_id"] == "foo@bar.net"


def _forwarded_rfc822(r: dict) -> None:
    assert [a["content_type"] for a in r["attachments"]] == ["message/rfc822"]


def _multipart_without_boundary(r: dict) -> None:
    assert "Blah blah blah" in r["content"]


CORPUS_EXPECTATIONS = {
    "mikel-mail__plain_emails__raw_email10.eml": _x_unknown_charset,
    "thunderbird__data__bad-charset.eml": _bad_charset_name,
    "thunderbird__data__wronglyDeclaredUTF8.eml": _utf8_declared_as_windows_1252,
    "thunderbird__data__noCharsetWindows1252.eml": _no_charset_8bit_body,
    "sisimai__mac__lhost-amavis-01.eml": _cr_only_line_endings,
    "mikel-mail__error_emails__bad_date_header.eml": _unparseable_date,
    "flanker__messages__from-encoding.eml": _8bit_from_name,
    "mikel-mail__rfc6532__utf8_headers.eml": _rfc6532_utf8_headers,
    "mikel-mail__plain_emails__raw_email_multiple_from.eml": _space_separated_addresses,
    "mikel-mail__error_emails__empty_group_lists.eml": _empty_group_lists,
    "flanker__messages__long-header.eml": _huge_header_block,
    "cpython__msg_07.eml": _gif_attachment,
    "mikel-mail__multi_charset__japanese_attachment_long_name.eml": _japanese_rfc2231_filename,
    "mikel-mail__multi_charset__japanese_iso_2022.eml": _iso_2022_jp,
    "mikel-mail__error_emails__multiple_references_with_one_invalid.eml": _references_with_invalid_id,
    "mikel-mail__attachment_emails__attachment_message_rfc822.eml": _forwarded_rfc822,
    "cpython__msg_41.eml": _multipart_without_boundary,
}


def _expectation_params() -> list:
    if not CORPUS_FILES:
        return [pytest.param(None, marks=NO_CORPUS, id="no-corpus")]
    return [pytest.param(name, id=name) for name in sorted(CORPUS_EXPECTATIONS)]


@pytest.mark.parametrize("name", _expectation_params())
def test_notable_corpus_files(name: str) -> None:
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"{name} not in this corpus")
    CORPUS_EXPECTATIONS[name](normalize_email(path.read_bytes()))
