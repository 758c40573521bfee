"""The benchmark's generated corpora have the shape they claim (tests/bench_corpus.py)."""

from __future__ import annotations

import base64
import io
import statistics
import zipfile
from collections import Counter
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from bench_corpus import KINDS, business_message, business_sample, typical_message

N = 1500
LEGACY_FAMILIES = ("iso-8859-", "windows-125", "koi8-r", "shift_jis", "gb2312")
_PARSER = BytesParser(policy=policy.default)


@pytest.fixture(scope="module")
def corpus():
    return [business_sample(n, seed=7) for n in range(N)]


@pytest.fixture(scope="module")
def parsed(corpus):
    return [_PARSER.parsebytes(s.raw) for s in corpus]


def test_deterministic_for_n_and_seed():
    assert business_message(42, seed=3) == business_message(42, seed=3)
    assert business_message(42, seed=3) != business_message(42, seed=4)
    assert business_message(42, seed=3) != business_message(43, seed=3)


def test_size_distribution_is_lognormal_with_a_heavy_tail(corpus):
    sizes = [len(s.raw) for s in corpus]
    mean, median = statistics.mean(sizes), statistics.median(sizes)
    deciles = statistics.quantiles(sizes, n=10)
    heavy = sum(size > 40_000 for size in sizes) / len(sizes)
    assert 8_000 <= mean <= 11_500, mean
    assert 4_000 <= median <= 5_800, median
    assert deciles[0] >= 2_000  # nothing absurdly small: every message has real headers
    assert 2_500 <= deciles[-1] <= 25_000  # p90: the body of the distribution is small mail
    assert 0.025 <= heavy <= 0.065, heavy
    assert max(sizes) <= 230_000


def test_share_of_each_kind(corpus):
    kinds = Counter(s.kind for s in corpus)
    share = {k: kinds[k] / len(corpus) for k in KINDS}
    assert set(kinds) == set(KINDS)
    assert all(share[k] >= 0.01 for k in KINDS), share
    assert 0.30 <= share["plain"] <= 0.55, share
    assert 0.12 <= share["reply_thread"] <= 0.30, share
    assert 0.05 <= share["newsletter_html"] + share["newsletter_alt"] <= 0.15, share
    assert 0.06 <= share["attachment"] + share["attachment_large"] + share["related"] <= 0.18, share
    assert 0.02 <= share["forward"] <= 0.08, share


def test_share_of_legacy_charsets(corpus):
    charsets = Counter(s.charset for s in corpus)
    legacy = sum(n for cs, n in charsets.items() if cs not in ("utf-8", "us-ascii")) / len(corpus)
    assert 0.09 <= legacy <= 0.20, charsets
    for family in LEGACY_FAMILIES:
        assert any(cs.startswith(family) for cs in charsets), (family, charsets)


def test_every_message_parses_cleanly_with_the_stdlib_parser(corpus, parsed):
    for sample, msg in zip(corpus, parsed, strict=True):
        assert [d for part in msg.walk() for d in part.defects] == [], sample.kind
        for name in ("from", "to", "cc", "subject", "date", "message-id"):
            value = msg.get(name)
            assert value is None or "=?" not in str(value), (name, value)  # every encoded word decodes
        assert msg["from"].addresses and msg["message-id"]
        body = msg.get_body(("plain", "html"))
        assert body is not None and body.get_content().strip(), sample.kind


def test_legacy_messages_declare_and_use_their_charset(corpus, parsed):
    legacy = encoded = 0
    for sample, msg in zip(corpus, parsed, strict=True):
        if sample.charset in ("utf-8", "us-ascii"):
            continue
        legacy += 1
        body = msg.get_body(("plain",)) or msg.get_body(("html",))
        assert body.get_content_charset() == sample.charset
        assert not body.get_content().isascii()
        raw_headers = sample.raw.split(b"\r\n\r\n", 1)[0]
        # Non-ASCII names and subjects go as RFC 2047 encoded words in that charset
        # (a few such messages have only ASCII names and subjects).
        if f"=?{sample.charset}?".encode() in raw_headers:
            encoded += 1
            assert not all(str(msg.get(h, "")).isascii() for h in ("subject", "from", "to", "cc"))
    assert legacy > 0 and encoded >= 0.8 * legacy, (encoded, legacy)


def test_kinds_have_their_structure(corpus, parsed):
    for sample, msg in zip(corpus, parsed, strict=True):
        types = [part.get_content_type() for part in msg.walk()]
        if sample.kind == "newsletter_html":
            assert types == ["text/html"]
            assert "<style" in msg.get_content() and msg["list-unsubscribe"]
        elif sample.kind == "newsletter_alt":
            assert types[:3] == ["multipart/alternative", "text/plain", "text/html"]
        elif sample.kind == "forward":
            assert "message/rfc822" in types
        elif sample.kind in ("attachment", "attachment_large"):
            assert types[0] == "multipart/mixed" and any(a.get_filename() for a in msg.iter_attachments())
        elif sample.kind == "related":
            assert "multipart/related" in types and "image/png" in types
        elif sample.kind == "reply_thread":
            assert msg["in-reply-to"] and msg["references"]
            assert msg["in-reply-to"] in str(msg["references"])
            text = msg.get_body(("plain",)).get_content().replace("\r\n", "\n")
            assert "wrote:\n>" in text or "\nFrom: " in text  # Gmail-style or Outlook-style quoting


def test_attachments_have_plausible_bytes(corpus, parsed):
    checked = Counter()
    for sample, msg in zip(corpus, parsed, strict=True):
        if sample.kind != "attachment_large":
            continue
        for part in msg.iter_attachments():
            data = part.get_content()
            ctype = part.get_content_type()
            if ctype == "application/pdf":
                assert data.startswith(b"%PDF-1.") and data.rstrip().endswith(b"%%EOF")
            elif ctype == "image/png":
                assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
            elif ctype == "image/jpeg":
                assert data.startswith(b"\xff\xd8\xff\xe0") and data.endswith(b"\xff\xd9")
            elif ctype.startswith("application/vnd.openxmlformats"):
                with zipfile.ZipFile(io.BytesIO(data)) as z:
                    assert z.testzip() is None and "[Content_Types].xml" in z.namelist()
            checked[ctype] += 1
    assert len(checked) >= 4, checked  # several kinds of files, each well-formed


def test_heavy_tail_comes_from_attachments_mostly(corpus):
    heavy = Counter(s.kind for s in corpus if len(s.raw) > 40_000)
    assert heavy["attachment_large"] > sum(heavy.values()) / 2, heavy


def test_encoded_words_are_base64_or_q_per_message(corpus):
    # Both RFC 2047 encodings occur (B for Cyrillic/CJK/Greek, either for Latin scripts).
    raw = b"".join(s.raw.split(b"\r\n\r\n", 1)[0] for s in corpus)
    assert b"?B?" in raw and b"?Q?" in raw
    word = raw[raw.index(b"=?koi8-r?B?") + 11:].split(b"?=")[0]
    assert base64.b64decode(word).decode("koi8-r")


def test_small_corpus_keeps_its_shape():
    msgs = [typical_message(n, seed=0) for n in range(400)]
    mean = statistics.mean(map(len, msgs))
    assert 3_000 <= mean <= 5_500, mean
    for raw in msgs[:50]:
        msg = _PARSER.parsebytes(raw)
        assert isinstance(msg, EmailMessage) and msg["message-id"]
        assert b"\n" not in raw.replace(b"\r\n", b"")  # wire format: CRLF only
