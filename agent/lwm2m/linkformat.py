"""CoRE link format (RFC 6690), parsed strictly and with bounds. Pure.

    </>;rt="oma.lwm2m";ct=11543,</1/0>,</3/0>,</3303/0>;ver=1.1

Sensors send this in LwM2M Register and Update. It comes from outside, so
every limit is explicit (size, links, parameters per link, value length) and
every refusal is a LinkFormatError saying what was wrong and at which byte.
Duplicate parameters in one link are refused: RFC 6690 allows some to repeat,
but nothing LwM2M sends needs it, and a second `ct` that silently wins is how
two parsers come to disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import Lwm2mError

MAX_BYTES = 8192
MAX_LINKS = 1024
MAX_PARAMS = 16
MAX_TARGET = 255
MAX_VALUE = 255
# RFC 5987/8288 parmname characters (a token), and what a ptoken may hold (RFC 6690).
_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&+-.^_`|~*")
_PTOKEN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    "!#$%&'()*+-.:<=>?@[]^_`{|}~/")
_TARGET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                    "-._~!$&'()*+,;=:@/%")


class LinkFormatError(Lwm2mError):
    def __init__(self, what: str, offset: int) -> None:
        super().__init__(f"link format, byte {offset}: {what}")
        self.offset = offset


@dataclass(frozen=True)
class Link:
    target: str
    params: dict[str, str | None]  # a parameter without "=value" maps to None


def parse_links(data: bytes) -> list[Link]:
    """The links in `data`, in order; LinkFormatError for anything outside RFC 6690 or
    the limits above."""
    if len(data) > MAX_BYTES:
        raise LinkFormatError(f"{len(data)} bytes, more than the {MAX_BYTES} accepted", 0)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise LinkFormatError("not ASCII", e.start) from None
    return _Parser(text).links()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def fail(self, what: str) -> LinkFormatError:
        return LinkFormatError(what, self.at)

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            found = repr(self.peek()) if self.peek() else "the end"
            raise self.fail(f"expected {char!r}, found {found}")
        self.at += 1

    def links(self) -> list[Link]:
        if not self.text:
            return []
        out = [self.link()]
        while self.peek() == ",":
            self.at += 1
            if len(out) >= MAX_LINKS:
                raise self.fail(f"more than {MAX_LINKS} links")
            out.append(self.link())
        if self.at != len(self.text):
            raise self.fail(f"expected ',' or the end, found {self.peek()!r}")
        return out

    def link(self) -> Link:
        self.expect("<")
        start = self.at
        while self.peek() not in (">", ""):
            if self.peek() not in _TARGET:
                raise self.fail(f"{self.peek()!r} in a link target")
            self.at += 1
        target = self.text[start:self.at]
        if len(target) > MAX_TARGET:
            raise LinkFormatError(f"a link target longer than {MAX_TARGET}", start)
        self.expect(">")
        params: dict[str, str | None] = {}
        while self.peek() == ";":
            self.at += 1
            name_at = self.at
            name = self.name()
            if name in params:
                raise LinkFormatError(f"parameter {name!r} twice in one link", name_at)
            if len(params) >= MAX_PARAMS:
                raise LinkFormatError(f"more than {MAX_PARAMS} parameters in one link", name_at)
            params[name] = self.value() if self.peek() == "=" else None
        return Link(target, params)

    def name(self) -> str:
        start = self.at
        while self.peek() and self.peek() in _NAME:
            self.at += 1
        if self.at == start:
            raise self.fail("expected a parameter name")
        return self.text[start:self.at].lower()  # parmnames are case-insensitive

    def value(self) -> str:
        self.expect("=")
        if self.peek() == '"':
            return self.quoted()
        start = self.at
        while self.peek() and self.peek() in _PTOKEN:
            self.at += 1
        if self.at == start:
            raise self.fail("expected a value after '='")
        if self.at - start > MAX_VALUE:
            raise LinkFormatError(f"a value longer than {MAX_VALUE}", start)
        return self.text[start:self.at]

    def quoted(self) -> str:
        start = self.at
        self.expect('"')
        chars: list[str] = []
        while True:
            char = self.peek()
            if char == "":
                raise LinkFormatError("a quoted string that does not end", start)
            self.at += 1
            if char == '"':
                break
            if char == "\\":
                char = self.peek()
                if char == "":
                    raise LinkFormatError("a quoted string that does not end", start)
                self.at += 1
            elif ord(char) < 0x20 or char == "\x7f":
                raise LinkFormatError("a control character in a quoted string", self.at - 1)
            chars.append(char)
            if len(chars) > MAX_VALUE:
                raise LinkFormatError(f"a value longer than {MAX_VALUE}", start)
        return "".join(chars)
