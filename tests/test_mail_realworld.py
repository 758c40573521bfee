"""Defects found with real-world mail (issue 13): each test shows one, with corpus mail where the corpus has it."""

from __future__ import annotations

import pytest

from commsync.connectors.mail import normalize_email

from seed import CORPUS


def corpus(name: str) -> bytes:
    path = CORPUS / name
    if not path.is_file():
        pytest.skip(f"{name} not in the email corpus (set COMMSYNC_CORPUS_DIR)")
    return path.read_bytes()


HEAD = b"Message-ID: <rw1@x.example>\r\nDate: Tue, 04 Mar 2025 10:00:00 +0000\r\nSubject: Quote\r\n"


def message(headers: bytes, body: bytes = b"Hello.\r\n") -> bytes:
    return HEAD + headers + b"\r\n" + body


def people(record: dict) -> list[tuple[str, str, str | None]]:
    return [(p["role"], p["address"], p["name"]) for p in record["participants"]]


# --------------------------------------------------------------------------- 2. address-like display names


def test_an_address_like_display_name_is_a_name_not_a_participant() -> None:
    raw = message(b"From: alice@example.com <bob@example.com>\r\nCc: eve@x <frank@y>, ann@example.org\r\n")
    assert people(normalize_email(raw)) == [
        ("from", "bob@example.com", "alice@example.com"),
        ("cc", "frank@y", "eve@x"),
        ("cc", "ann@example.org", None),
    ]


def test_corpus_display_name_with_an_at_sign() -> None:
    record = normalize_email(corpus("mikel-mail__plain_emails__raw_email_with_at_display_name.eml"))
    assert [p for p in people(record) if p[0] == "to"] == [
        ("to", "smith@gmail.com", None),
        ("to", "raasdnil@gmail.com", "Mikel@Lindsaar"),
        ("to", "tom@gmail.com", None),
    ]


def test_quoted_names_comments_and_groups_still_parse() -> None:
    raw = message(
        b'From: "Lopez, Maria" <maria@example.com>\r\n'
        b"To: Team: a@example.com, B <b@example.com>;, c@example.com (Carl)\r\n"
        b"Cc: undisclosed-recipients:;\r\n"
        b'Bcc: "Bob <bob@evil.example>" <bob@example.com>\r\n'
    )
    assert people(normalize_email(raw)) == [
        ("from", "maria@example.com", "Lopez, Maria"),
        ("to", "a@example.com", None),
        ("to", "b@example.com", "B"),
        ("to", "c@example.com", "Carl"),
        ("bcc", "bob@example.com", "Bob <bob@evil.example>"),
    ]


# --------------------------------------------------------------------------- 3. a name, then a bare address


def test_a_bare_address_after_a_name() -> None:
    record = normalize_email(message(b"From: Big Bug bb@bug.com\r\nTo: Ann Lee ann@example.org, sales@ourco.example\r\n"))
    assert people(record) == [
        ("from", "bb@bug.com", "Big Bug"),
        ("to", "ann@example.org", "Ann Lee"),
        ("to", "sales@ourco.example", None),
    ]


# --------------------------------------------------------------------------- 4. byte-order mark


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_leading_byte_order_mark_keeps_the_headers(eol: bytes) -> None:
    raw = b"\xef\xbb\xbf" + message(b"From: Ann <ann@example.org>\r\n", b"Body.\r\n").replace(b"\r\n", eol)
    record = normalize_email(raw)
    assert record["message_id"] == "rw1@x.example"
    assert record["subject"] == "Quote"
    assert people(record) == [("from", "ann@example.org", "Ann")]
    assert record["occurred_at"].year == 2025 and "date:missing" not in record["parse_defects"]
    assert record["content"] == "Body."
    assert record["size"] == len(raw)


# --------------------------------------------------------------------------- 5. blank first text part


def test_a_blank_first_text_part_does_not_hide_the_body() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n \r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe real text.\r\n"
        b"--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>HTML copy</p>\r\n--b--\r\n"
    )
    record = normalize_email(message(b'Content-Type: multipart/mixed; boundary="b"\r\n', body))
    assert record["content"] == "The real text."
    assert record["attachments"] == []


def test_blank_text_parts_then_html() -> None:
    body = (
        b"--b\r\nContent-Type: text/plain\r\n\r\n\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<p> </p>\r\n"
        b"--b\r\nContent-Type: text/html\r\n\r\n<p>Second HTML part</p>\r\n--b--\r\n"
    )
    record = normalize_email(message(b'Content-Type: multipart/mixed; boundary="b"\r\n', body))
    assert record["content"] == "Second HTML part"


# --------------------------------------------------------------------------- 6. one bad byte in an 8-bit header


def test_one_truncated_utf8_sequence_garbles_only_itself() -> None:
    name = "Иван Петров".encode()
    filename = "Счёт на оплату.pdf".encode()
    broken_name = name[:-1]  # "в" cut in half, then the closing quote
    raw = message(
        b'From: "' + broken_name + b'" <ivan@example.ru>\r\nContent-Type: multipart/mixed; boundary="b"\r\n',
        b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b'--b\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename="'
        + filename[:5]
        + filename[6:]  # the second byte of "ё" is missing
        + b'"\r\n\r\n%PDF\r\n--b--\r\n',
    )
    record = normalize_email(raw)
    assert record["participants"][0]["name"] == "Иван Петро\ufffd"
    assert record["attachments"][0]["filename"] == "Сч\ufffdт на оплату.pdf"


def test_corpus_display_name_with_a_broken_utf8_byte() -> None:
    record = normalize_email(corpus("flanker__messages__mailformed-headers.eml"))
    assert people(record)[0] == ("from", "headers@gmail.com", "Юникод запрещен\ufffd")


def test_latin1_headers_are_still_latin1() -> None:
    raw = message(b"From: J\xf6rg M\xfcller <j@example.de>\r\n")
    assert normalize_email(raw)["participants"][0]["name"] == "Jörg Müller"


# --------------------------------------------------------------------------- 7. folded boundary


def test_a_folded_boundary_parameter_is_unfolded() -> None:
    raw = message(
        b'Content-Type: multipart/mixed; boundary="foo\r\n bar"\r\n',
        b"--foo bar\r\nContent-Type: text/plain\r\n\r\nThe text.\r\n"
        b"--foo bar\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nFrom: i@x.example\r\n\r\ninner body\r\n"
        b"--foo bar--\r\n",
    )
    record = normalize_email(raw)
    assert record["content"] == "The text."
    assert [a["content_type"] for a in record["attachments"]] == ["message/rfc822"]
    assert record["parse_defects"] == []


# --------------------------------------------------------------------------- 8. undeclared legacy charsets

BIG5_TEXT = (
    "王先生您好：\n\n附件是您上週詢問的產品報價單，請查收。如果您對價格或交貨時間有任何問題，歡迎隨時與我們聯絡。\n"
    "我們會盡快回覆您。\n\n祝 商祺\n客戶服務部 陳小姐"
)
JAPANESE_TEXT = (
    "山田様\n\nいつもお世話になっております。株式会社サンプルの佐藤です。\n"
    "先日ご依頼いただきました見積書を添付いたしますので、ご確認ください。\nよろしくお願いいたします。"
)
RUSSIAN_TEXT = "Здравствуйте, Иван Петрович!\nВо вложении счёт на оплату за март. Просим оплатить до пятницы.\nС уважением, отдел продаж."


@pytest.mark.parametrize(
    ("text", "codec"),
    [(BIG5_TEXT, "big5"), (JAPANESE_TEXT, "shift_jis"), (JAPANESE_TEXT, "euc_jp"), (RUSSIAN_TEXT, "koi8-r"), (RUSSIAN_TEXT, "cp1251")],
    ids=["big5", "shift_jis", "euc_jp", "koi8-r", "cp1251"],
)
def test_an_undeclared_legacy_charset_is_detected(text: str, codec: str) -> None:
    record = normalize_email(message(b"Content-Type: text/plain\r\n", text.replace("\n", "\r\n").encode(codec)))
    assert record["content"] == text


def test_undeclared_html_in_big5() -> None:
    html = f"<html><body><p>{BIG5_TEXT}</p></body></html>".encode("big5")
    record = normalize_email(message(b"Content-Type: text/html\r\n", html))
    assert "附件是您上週詢問的產品報價單" in record["content"]


@pytest.mark.parametrize(
    "text",
    [
        "Hola, gracias por su pedido. Saludos desde España, señor.",
        "Sehr geehrte Frau Müller,\nanbei erhalten Sie die Rechnung für März. Mit freundlichen Grüßen, Ihr Team aus Köln",
        "Bonjour Madame Lefèvre,\nci-joint la facture de mars. Cordialement — à bientôt, très chère cliente, déjà noté.",
        "Widget\u2122 price",
    ],
    ids=["es", "de", "fr", "tm"],
)
def test_undeclared_western_text_stays_windows_1252(text: str) -> None:
    record = normalize_email(message(b"", text.replace("\n", "\r\n").encode("cp1252")))
    assert record["content"] == text


def test_corpus_undeclared_windows_1252_body() -> None:
    record = normalize_email(corpus("thunderbird__data__noCharsetWindows1252.eml"))
    assert "espa\u00f1ol" in record["content"]


def test_only_a_sample_is_detected_on() -> None:
    # A megabyte of Big5 with a Windows-1252 tail: the sample decides, the whole text is decoded with it.
    body = BIG5_TEXT.replace("\n", "\r\n").encode("big5") * 3000 + "\r\nEnvoyé".encode("cp1252")
    content = normalize_email(message(b"", body), max_content_chars=500)["content"]
    assert content.startswith(BIG5_TEXT[:40])


def test_undeclared_utf8_with_one_bad_byte_stays_utf8() -> None:
    text = "Grüße aus München, schöne Grüße"
    data = text.encode()
    record = normalize_email(message(b"", data[:3] + data[4:] + b"\r\n"))  # half of "ü" lost
    assert record["content"] == "Gr\ufffdße aus München, schöne Grüße"
