"""mime.FastParser must build the Message tree BytesParser(policy=compat32) builds.

Both build it from mime.MimeMessage, compat32's Message with one repair (a
folded boundary parameter is unfolded), so the reference here uses it too.

The fast parser is a port of the stdlib feedparser that slices bodies instead
of reading them line by line; normalize_email relies on it giving exactly the
stdlib's headers, payloads, preambles, epilogues and defects. Comparing whole
trees on many awkward inputs also catches a future CPython changing its parser.
"""

from __future__ import annotations

import base64
import random
from email import policy
from email.message import Message
from email.parser import BytesParser

import pytest

from commsync.connectors import mime

from seed import CORPUS_FILES

STDLIB = BytesParser(_class=mime.MimeMessage, policy=policy.compat32)




def tree(msg: Message) -> list:
    """Everything the parser decides about a message, recursively."""
    payload = msg._payload
    return [
        msg._headers,
        msg._unixfrom,
        msg.preamble,
        msg.epilogue,
        msg.get_default_type(),
        [(type(d).__name__, str(d), getattr(d, "line", None)) for d in msg.defects],
        [tree(p) for p in payload] if isinstance(payload, list) else payload,
    ]


def fast_tree(raw: bytes) -> list | None:
    """The fast parser's tree, or None when it hands the message to the stdlib."""
    try:
        return tree(mime.FastParser(raw.decode("ascii", "surrogateescape")).parse())
    except mime.Fallback:
        return None


def assert_same_tree(raw: bytes) -> None:
    fast = fast_tree(raw)
    if fast is not None:
        assert fast == tree(STDLIB.parsebytes(raw))


def eol_variants(raw: bytes) -> list[bytes]:
    lf = raw.replace(b"\r\n", b"\n")
    mixed = b"".join(
        line + (b"\r\n", b"\n", b"\r")[i % 3] for i, line in enumerate(lf.split(b"\n"))
    )
    return [raw, lf, lf.replace(b"\n", b"\r\n"), lf.replace(b"\n", b"\r"), mixed]


PDF_B64 = base64.encodebytes(bytes(range(256)) * 40).decode()
INNER = "Subject: inner\nFrom: i@x.example\n\ninner body\n"

# Awkward structures, LF line endings (eol_variants adds the others).
STRUCTURES = {
    "boundary-text-in-lines": "Content-Type: multipart/mixed; boundary=AAAA\n\n--AAAA\n\nHi --AAAA x\n--AAAAx\n --AAAA\n"
    f"--AAAA\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\nAAAA--AAAA\n{PDF_B64}--AAAA--\n",
    "padding": "Content-Type: multipart/mixed; boundary=b\n\n--b \t\n\nx\n--b\t\n\ny\n--b--  \t\nepilogue\n",
    "close-without-eol": "Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b--",
    "no-close": "Content-Type: multipart/mixed; boundary=b\n\npreamble\n\n--b\n\nx\n--b\nContent-Type: text/html\n\n<p>",
    "only-close": "Content-Type: multipart/mixed; boundary=b\n\npre\n--b--\nafter\n",
    "no-start": "Content-Type: multipart/mixed; boundary=b\n\njust text\n",
    "no-boundary-param": "Content-Type: multipart/mixed\n\n--b\n\nx\n--b--\n",
    "empty-boundary": 'Content-Type: multipart/mixed; boundary=""\n\n--\n\nx\n----\n',
    "regex-chars": 'Content-Type: multipart/mixed; boundary="a+b(c)?.*"\n\n--a+b(c)?.*\n\nx\n--a+b(c)?.*--\n',
    "doubled": "Content-Type: multipart/mixed; boundary=b\n\n--b\n--b\n\nx\n--b\n--b--\n\ny\n--b--\n",
    "nested": "Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/alternative; boundary=i\n\n"
    "--i\n\nplain\n--i\nContent-Type: text/html\n\n<p>h</p>\n--i--\nepi\n--o\nContent-Type: application/pdf\n\nx\n--o--\n",
    "outer-ends-inner": "Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/alternative; boundary=o-i\n\n"
    "--o-i\n\nplain\n--o\n\nsecond\n--o--\n",
    "same-boundary-nested": "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: multipart/mixed; boundary=b\n\n"
    "--b\n\ninner\n--b--\n--b--\n",
    "bad-multipart-cte": "Content-Type: multipart/mixed; boundary=b\nContent-Transfer-Encoding: base64\n\n--b\n\nx\n--b--\n",
    "rfc822": f"Content-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b\nContent-Type: message/rfc822\n\n{INNER}--b--\n",
    "rfc822-root": f"Content-Type: message/rfc822\n\n{INNER}",
    "digest": f"Content-Type: multipart/digest; boundary=d\n\n--d\n\n{INNER}--d\nContent-Type: text/plain\n\nt\n--d--\n",
    "delivery-status": "Content-Type: multipart/report; boundary=r\n\n--r\n\nfailed\n--r\nContent-Type: message/delivery-status\n\n"
    "Reporting-MTA: dns; x\n\nFinal-Recipient: rfc822; a@b\nAction: failed\n\n\n--r--\n",
    "headers-only": "Subject: x\nFrom: a@b.example",
    "no-separator": "Subject: x\nnot a header\nbody\n",
    "odd-header-lines": "From sender Mon Jan  1 00:00:00 2024\n continuation\nSubject: x\n:no name\nFrom misplaced\nX: y\n\nbody\n",
    "from-line-last": "Subject: x\nFrom someone\n\nbody\n",
    "8bit": "From: J\xf6rg <j@x.example>\nContent-Type: multipart/mixed; boundary=b\n\n--b\n"
    'Content-Disposition: attachment; filename="gr\xf6\xdfe.txt"\n\n\xe9\n--b--\n',
    "control-chars": "Subject: a\x0bb\x0c\nContent-Type: multipart/mixed; boundary=b\n\n--b\n\nx\x0b--b\x0c\n--b\x0b\n--b--\n",
    "folded-boundary": 'Content-Type: multipart/mixed; boundary="foo\n bar"\n\n--foo bar\n\nx\n--foo bar--\n',
    "folded-boundary-tab": "Content-Type: multipart/mixed; boundary=\n\t\"a\n\tb\"\n\n--a\tb\n\nx\n--a\tb--\n",
    "empty": "",
    "blank-lines": "\n\n\n",
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_structures(name: str) -> None:
    raw = STRUCTURES[name].encode("latin-1")
    for variant in eol_variants(raw):
        assert_same_tree(variant)
        for cut in range(1, len(variant), 7):
            assert_same_tree(variant[:cut])


def test_fast_path_is_taken_for_well_formed_structures() -> None:
    fallback = {name for name, text in STRUCTURES.items() if fast_tree(text.encode("latin-1")) is None}
    assert fallback == {"from-line-last"}


@pytest.mark.skipif(not CORPUS_FILES, reason="email corpus not found (set COMMSYNC_CORPUS_DIR)")
def test_corpus() -> None:
    rng = random.Random(5)
    for path in CORPUS_FILES:
        raw = path.read_bytes()
        assert fast_tree(raw) is not None, path.name  # the corpus needs no fallback
        for variant in eol_variants(raw):
            assert_same_tree(variant)
        for _ in range(5):
            assert_same_tree(raw[: rng.randrange(1, len(raw))])


@pytest.mark.skipif(not CORPUS_FILES, reason="email corpus not found (set COMMSYNC_CORPUS_DIR)")
def test_mutated_corpus() -> None:
    rng = random.Random(11)
    files = [p.read_bytes() for p in CORPUS_FILES if p.stat().st_size < 100_000]
    for _ in range(1500):
        data = bytearray(rng.choice(files))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data) or 1)
            op = rng.random()
            if op < 0.3:  # a boundary-ish line, copied elsewhere
                start = data.find(b"\n--", i)
                if start >= 0:
                    end = data.find(b"\n", start + 1)
                    pos = rng.randrange(len(data) + 1)
                    data[pos:pos] = data[start + 1 : end + 1 if end >= 0 else len(data)]
            elif op < 0.5:
                data[i:i] = rng.choice([b"\r", b"\n", b"\r\n", b"\n\n", b"--", b" "])
            elif op < 0.7:
                del data[i : i + rng.randint(1, 200)]
            else:
                data[i : i + 1] = bytes([rng.randrange(256)])
        assert_same_tree(bytes(data))
