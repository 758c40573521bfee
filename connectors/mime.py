"""MIME structure: raw message bytes to the stdlib's compat32 Message tree, fast. Pure.

``FastParser`` builds exactly the tree ``BytesParser(policy=compat32)`` builds
(tests/test_mail_equivalence.py pins that) without feeding bodies through the
feedparser line by line: bodies are sliced at their boundary lines. Attachment
payloads are never decoded here. Both read boundaries through ``MimeMessage``,
which unfolds a folded boundary parameter.
"""

from __future__ import annotations

import re
from email import errors, policy
from email.message import Message
from email.parser import BytesParser
from typing import Any

__all__ = ["Fallback", "FastParser", "MimeMessage", "parse"]

_LINEBREAK = re.compile(r"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"


def parse(raw: bytes) -> Message:
    """The compat32 Message tree of ``raw``; raises only if the stdlib parser does too."""
    if raw.startswith(_BOM):
        # Windows tools write .eml files with a UTF-8 byte-order mark; it is not part of
        # the message, and in front of the first header it would make every header body text.
        raw = raw[len(_BOM) :]
    try:
        return FastParser(raw.decode("ascii", "surrogateescape")).parse()
    except Exception:
        # Fallback, or a bug: the stdlib parser decides (and may fail the same way).
        pass
    return _PARSER.parsebytes(raw)


class MimeMessage(Message):
    """The compat32 Message, with a boundary parameter folded across lines unfolded.

    ``boundary="foo<CRLF> bar"`` is the boundary "foo bar" (RFC 5322
    unfolding: the line break goes, the whitespace stays). The stdlib keeps the
    line break in it, so no boundary line ever matched and the multipart was
    never split. Both parsers here build their trees from this class.
    """

    def get_boundary(self, failobj: Any = None) -> Any:
        boundary = Message.get_boundary(self, failobj)
        if isinstance(boundary, str) and ("\r" in boundary or "\n" in boundary):
            boundary = _LINEBREAK.sub("", boundary)
        return boundary


_PARSER = BytesParser(_class=MimeMessage, policy=policy.compat32)


class _Part(MimeMessage):
    """A compat32 Message that reads its headers and parameters only once.

    The record needs each part's content type, disposition, transfer encoding,
    charset, filename and boundary, and every ``get``/``get_param`` scans all
    headers (or parses the whole Content-Type) again. Only ``FastParser``
    builds these, and reads them once their headers are complete; nothing
    changes the headers afterwards (``set_param`` and friends would make
    the cached answers stale: not used), so the answers are kept.
    """

    def _memo(self) -> dict[Any, Any]:
        try:
            return self._cs_memo  # type: ignore[has-type,no-any-return]
        except AttributeError:
            memo = self._cs_memo = {"names": [name.lower() for name, _ in self._headers]}
            return memo

    def get(self, name: str, failobj: Any = None) -> Any:
        try:
            index = self._memo()["names"].index(name.lower())
        except ValueError:
            return failobj
        return self.policy.header_fetch_parse(*self._headers[index])

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._memo()["names"]

    def get_content_type(self) -> str:
        memo = self._memo()
        ctype = memo.get("ctype")
        if ctype is None:
            ctype = memo["ctype"] = Message.get_content_type(self)
        return ctype  # type: ignore[no-any-return]

    def get_param(self, param: str, failobj: Any = None, header: str = "content-type", unquote: bool = True) -> Any:
        memo = self._memo()
        key = ("param", param.lower(), header.lower(), unquote)
        value = memo.get(key, _NOT_PARSED)
        if value is _NOT_PARSED:
            value = memo[key] = Message.get_param(self, param, _NO_VALUE, header, unquote)
        return failobj if value is _NO_VALUE else value

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        memo = self._memo()
        key = ("params", header.lower())
        params = memo.get(key, _NOT_PARSED)
        if params is _NOT_PARSED:
            params = memo[key] = Message._get_params_preserve(self, _NO_VALUE, header)
        return failobj if params is _NO_VALUE else params


_NOT_PARSED = object()
_NO_VALUE = object()

# email.feedparser's header-line test (headerRE), extended to the whole line.
_HEADER_LINE = re.compile(r"(?:From |[\041-\071\073-\176]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n)?")
_HEADER_LINES = re.compile(r"(?:(?:From |[\041-\071\073-\176]*:|[\t ])[^\r\n]*(?:\r\n|\r|\n)?)*")
# One whole field (name, value as compat32's header_source_parse cuts it, before
# the final rstrip) of a header block without the lines _odd_header_lines looks for.
_HEADER_FIELD = re.compile(r"([\041-\071\073-\176]+):[ \t]*([^\r\n]*(?:\r\n|\r|\n)?(?:[ \t][^\r\n]*(?:\r\n|\r|\n)?)*)")
_BLANK_LINE_START = re.compile(r"(?:(?<=\n)|(?<=\r)(?!\n))[\r\n]")
# On the EOF stack, the feedparser's blank-line matcher (message/delivery-status
# blocks). No boundary separator has a line break in it.
_BLANK_LINE = "\n"
_MAX_FAST_DEPTH = 40  # deeper nesting goes to the stdlib parser, with its own limits


class Fallback(Exception):
    """Input the fast parser does not reproduce exactly: use the stdlib parser."""


def _eol_len(text: str) -> int:
    """Length of the line break that ends ``text`` (feedparser's NLCRE_eol)."""
    if text.endswith("\r\n"):
        return 2
    return 1 if text.endswith(("\r", "\n")) else 0


class FastParser:
    """The stdlib compat32 parser's result, without reading bodies line by line.

    ``BytesParser(policy=compat32)`` feeds every line of every part, base64
    attachments included, through ``email.feedparser``, and compiles a regex
    per multipart boundary. This is a port of ``FeedParser._parsegen``
    (CPython 3.11-3.13) that works on positions in the decoded text instead:
    header blocks are still split into lines and parsed as there, but a body
    is one slice up to the line that ends it, i.e. the first line that one of
    the enclosing multiparts' boundary patterns (the feedparser's EOF-matcher
    stack) matches, found with ``str.find``. It builds the same Message tree:
    same headers, payload strings, preambles, epilogues and defects. The few
    constructs it does not port raise ``Fallback`` (a "From " line ending a
    header block, a boundary with a line break in it, very deep nesting).
    """

    __slots__ = ("cur", "depth", "found", "last", "length", "pos", "stack", "text", "trail")

    def __init__(self, text: str) -> None:
        self.text = text
        self.length = len(text)
        self.pos = 0
        self.stack: list[str] = []  # "--" + boundary of each enclosing multipart being read
        self.found: dict[str, tuple[int, int]] = {}  # separator -> (searched from, first hit)
        self.trail: list[Message] = []  # feedparser's _msgstack
        self.cur: Message | None = None
        self.last: Message | None = None
        self.depth = 0

    def parse(self) -> Message:
        self._entity()
        root = self._pop()
        if root.get_content_maintype() == "multipart" and not root.is_multipart():
            root.defects.append(errors.MultipartInvariantViolationDefect())
        return root

    # -- lines

    def _boundary_line(self, at: int, sep: str) -> tuple[bool, int, bool] | None:
        """Match the line starting at ``at`` (which starts with ``sep``) like the
        feedparser's ``--boundary(--)?[ \\t]*(\\r\\n|\\r|\\n)?$`` does.

        Returns (closing delimiter, end of the line, has a line break), or None.
        """
        text, length = self.text, self.length
        j = at + len(sep)
        close = text.startswith("--", j)
        if close:
            j += 2
        while j < length and (text[j] == " " or text[j] == "\t"):
            j += 1
        if j == length:
            return close, j, False
        char = text[j]
        if char == "\n":
            return close, j + 1, True
        if char == "\r":
            return close, j + 2 if text.startswith("\n", j + 1) else j + 1, True
        return None

    def _next(self, sep: str, pos: int) -> int:
        """Start of the first line at/after ``pos`` that ``sep``'s pattern matches, else the end."""
        hit = self.found.get(sep)
        if hit is not None and hit[0] <= pos <= hit[1]:
            return hit[1]  # positions only move forward, so an earlier search still holds
        text = self.text
        if sep == _BLANK_LINE:
            at = self._next_blank(pos)
            self.found[sep] = (pos, at)
            return at
        at = text.find(sep, pos)
        while at >= 0:
            if (at == 0 or text[at - 1] in "\r\n") and self._boundary_line(at, sep) is not None:
                break
            at = text.find(sep, at + 1)
        else:
            at = self.length
        self.found[sep] = (pos, at)
        return at

    def _next_blank(self, pos: int) -> int:
        """Start of the first empty line at/after ``pos`` (a line start), else the end."""
        if pos < self.length and self.text[pos] in "\r\n":
            return pos
        match = _BLANK_LINE_START.search(self.text, pos)
        return match.start() if match else self.length

    def _eof(self, pos: int) -> int:
        """Where the current entity ends: the first line an enclosing boundary claims."""
        end = self.length
        for sep in self.stack:
            at = self._next(sep, pos)
            if at < end:
                end = at
        return end

    # -- messages

    def _new(self) -> Message:
        msg = _Part()
        cur = self.cur
        if cur is not None and cur.get_content_type() == "multipart/digest":
            msg.set_default_type("message/rfc822")
        if self.trail:
            self.trail[-1].attach(msg)
        self.trail.append(msg)
        self.cur = self.last = msg
        return msg

    def _pop(self) -> Message:
        msg = self.trail.pop()
        self.cur = self.trail[-1] if self.trail else None
        return msg

    def _entity(self) -> None:
        """One message or body part: headers, then the body (feedparser's _parsegen)."""
        self.depth += 1
        if self.depth > _MAX_FAST_DEPTH:
            raise Fallback
        msg = self._new()
        text, start = self.text, self.pos
        limit = self._eof(start)
        end = block_end = _HEADER_LINES.match(text, start, limit).end()
        if end < limit:  # the line after the headers: blank, or the first body line
            char = text[end]
            if char == "\n":
                end += 1
            elif char == "\r":
                end += 2 if text.startswith("\n", end + 1) else 1
            else:
                msg.defects.append(errors.MissingHeaderBodySeparatorDefect())
        self.pos = end
        if block_end > start:
            if text[start] in " \t" or text.startswith(("From ", ":"), start) or _odd_header_lines(text, start, block_end):
                self._headers(msg, _HEADER_LINE.findall(text, start, block_end))
            else:  # every line is a "Name: value" field or continues one
                msg._headers = [(name, value.rstrip("\r\n")) for name, value in _HEADER_FIELD.findall(text, start, block_end)]
        ctype = msg.get_content_type()
        maintype = ctype.split("/")[0]
        if ctype == "message/delivery-status":
            self._status_blocks()
        elif maintype == "message":
            self._entity()
            self._pop()
        elif maintype == "multipart":
            self._multipart(msg)
        else:
            body_end = self._eof(self.pos)
            msg._payload = text[self.pos : body_end]
            self.pos = body_end
        self.depth -= 1

    def _status_blocks(self) -> None:
        """message/delivery-status: header blocks separated by blank lines, one Message each."""
        while True:
            self.stack.append(_BLANK_LINE)
            self._entity()
            self._pop()
            self.stack.pop()
            pos = self.pos
            if self._eof(pos) != pos:  # read (and drop) the blank line
                match = _LINEBREAK.search(self.text, pos)
                pos = match.end() if match else self.length
            self.pos = pos
            if self._eof(pos) == pos:
                return

    @staticmethod
    def _headers(msg: Message, lines: list[str]) -> None:
        """feedparser's _parse_headers."""
        value: list[str] | None = None
        headers = msg._headers
        for lineno, line in enumerate(lines):
            if line[0] in " \t":
                if value is None:
                    msg.defects.append(errors.FirstHeaderLineIsContinuationDefect(line))
                else:
                    value.append(line)
                continue
            if value is not None:
                headers.append(_header_source_parse(value))
                value = None
            if line.startswith("From "):
                if lineno == 0:
                    msg.set_unixfrom(line[: len(line) - _eol_len(line)])
                    continue
                if lineno == len(lines) - 1:
                    raise Fallback  # pushed back into the body, after the blank line
                msg.defects.append(errors.MisplacedEnvelopeHeaderDefect(line))
                continue
            colon = line.find(":")
            if colon == 0:
                msg.defects.append(errors.InvalidHeaderDefect("Missing header name."))
                continue
            if colon < 0:
                raise Fallback
            value = [line]
        if value is not None:
            headers.append(_header_source_parse(value))

    def _multipart(self, msg: Message) -> None:
        text = self.text
        boundary = msg.get_boundary()
        if boundary is None:
            msg.defects.append(errors.NoBoundaryInMultipartDefect())
            body_end = self._eof(self.pos)
            msg._payload = text[self.pos : body_end]
            self.pos = body_end
            return
        if str(msg.get("content-transfer-encoding", "8bit")).lower() not in ("7bit", "8bit", "binary"):
            msg.defects.append(errors.InvalidMultipartContentTransferEncodingDefect())
        sep = "--" + boundary
        if "\r" in sep or "\n" in sep:
            raise Fallback
        start = pos = self.pos
        stop = pos  # end of the preamble
        capturing_preamble = True
        close_seen = has_linesep = False
        while True:
            eof = self._eof(pos)  # this multipart's own boundary is not on the stack yet
            own = self._next(sep, pos)
            if capturing_preamble:
                if own >= eof:  # an enclosing boundary (or the end) comes first, or claims the line
                    stop = pos = eof
                    break
                stop = own
                match = self._boundary_line(own, sep)
                assert match is not None
                if match[0]:
                    close_seen, has_linesep, pos = True, match[2], match[1]
                    break
                if own > start:
                    preamble = text[start:own]
                    msg.preamble = preamble[: len(preamble) - _eol_len(preamble)]
                capturing_preamble = False
                pos = own
                continue
            if eof == pos:
                break
            if own != pos:
                raise Fallback  # cannot happen: a part ends at a boundary line or the end
            match = self._boundary_line(pos, sep)
            assert match is not None
            if match[0]:
                close_seen, has_linesep, pos = True, match[2], match[1]
                break
            pos = match[1]
            # Consecutive boundary lines enclose no part.
            while self._eof(pos) != pos and self._next(sep, pos) == pos:
                match = self._boundary_line(pos, sep)
                assert match is not None
                pos = match[1]
            self.stack.append(sep)
            self.pos = pos
            self._entity()
            # The line break before a boundary belongs to the boundary.
            last = self.last
            assert last is not None
            if last.get_content_maintype() == "multipart":
                epilogue = last.epilogue
                if epilogue == "":
                    last.epilogue = None
                elif epilogue is not None and _eol_len(epilogue):
                    last.epilogue = epilogue[: -_eol_len(epilogue)]
            else:
                payload = last._payload
                if isinstance(payload, str) and _eol_len(payload):
                    last._payload = payload[: -_eol_len(payload)]
            self.stack.pop()
            self._pop()
            self.last = self.cur
            pos = self.pos
        if capturing_preamble:
            msg.defects.append(errors.StartBoundaryNotFoundDefect())
            msg._payload = text[start:stop]
            msg.epilogue = ""
            self.pos = self._eof(pos)  # the rest is read and dropped
            return
        if not close_seen:
            msg.defects.append(errors.CloseBoundaryNotFoundDefect())
            self.pos = pos
            return
        body_end = self._eof(pos)
        if not has_linesep and body_end != pos:
            raise Fallback  # cannot happen: only the last line lacks a line break
        msg.epilogue = text[pos:body_end] if has_linesep else ""
        self.pos = body_end


def _odd_header_lines(text: str, start: int, end: int) -> bool:
    """Whether a line after the first of text[start:end] starts with "From " or ":"."""
    return any(text.find(mark, start, end) >= 0 for mark in ("\nFrom ", "\rFrom ", "\n:", "\r:"))


def _header_source_parse(lines: list[str]) -> tuple[str, str]:
    """compat32's header_source_parse: (name, value) of one header's raw lines."""
    name, value = lines[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(lines[1:])
    return name, value.rstrip("\r\n")

