"""HTTP/1.1 request heads (RFC 9110/9112), parsed strictly, and responses encoded.

Everything here is pure (bytes in, a typed head or an `HttpError` out), so the
fuzz harness and the hostile corpus judge exactly what the server runs. Strict on
purpose: a local inference API has a handful of well-behaved clients (curl,
tritonclient, our client), and every ambiguity a lenient parser accepts (two
lengths, `+5`, obs-fold, bare LF) is a way to smuggle or to confuse a proxy.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent.errors import BadRequestError, ServingError

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
# More digits than any body the agent accepts could need; parsed only when shorter.
_MAX_LENGTH_DIGITS = 15
_OVER_ANY_LIMIT: int = 10**_MAX_LENGTH_DIGITS

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_DIGITS = re.compile(r"[0-9]+")
# name ":" OWS value OWS; values are visible ASCII, space, tab and obs-text (RFC 9110 5.5).
_FIELD_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")


_TCHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VCHARS = rb"[\t\x20-\x7e\x80-\xff]*"
_FAST_HEAD = re.compile(
    rb"(" + _TCHARS + rb") (/[\x21-\x7e]*) HTTP/1\.([01])\r\n"
    rb"((?:" + _TCHARS + rb":" + _VCHARS + rb"\r\n)*)\r\n"
)


def _bare_lf(data: bytes | bytearray) -> bool:
    # Counting is C speed; a look-behind regex costs more than the rest of the parse.
    return data.count(b"\n") != data.count(b"\r\n")


class HttpError(ServingError):
    """A request refused at the HTTP layer; `headers` go into the answer."""

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class UnauthorizedError(HttpError):
    code = "auth.required"
    status = 401


class InvalidTokenError(UnauthorizedError):
    code = "auth.invalid"


class EndpointNotFoundError(HttpError):
    code = "endpoint.not_found"
    status = 404


class MethodNotAllowedError(HttpError):
    code = "request.method"
    status = 405


class RequestTimeoutError(HttpError):
    code = "request.timeout"
    status = 408


class LengthRequiredError(HttpError):
    code = "request.length"
    status = 411


class UnsupportedMediaError(HttpError):
    code = "request.media_type"
    status = 415


class ExpectationFailedError(HttpError):
    code = "request.expectation"
    status = 417


class HeadersTooLargeError(HttpError):
    code = "request.headers"
    status = 431


class NotImplementedCodingError(HttpError):
    code = "request.transfer_encoding"
    status = 501


class VersionNotSupportedError(HttpError):
    code = "request.version"
    status = 505


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is on the other end of a connection (set once per connection)."""

    uid: int | None  # the Unix socket peer's uid (SO_PEERCRED); None over TCP
    tcp: bool


@dataclass(slots=True)  # not frozen: frozen dataclasses cost microseconds per request
class RequestHead:
    method: str
    target: str
    path: str
    version: str  # "HTTP/1.0" or "HTTP/1.1"
    headers: dict[str, str] = field(default_factory=dict)
    content_length: int = 0
    expect_continue: bool = False
    caller: Caller | None = None  # set by the server; None: unknown (treated as TCP)

    @property
    def keep_alive(self) -> bool:
        connection = {t.strip() for t in self.headers.get("connection", "").lower().split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


def find_head_end(buf: bytes | bytearray) -> int:
    """Offset just past the blank line ending the head, or -1 while incomplete.

    Raises on a head over MAX_HEAD_BYTES or with a bare LF (which would otherwise
    leave a client that ends lines with LF waiting for the head deadline)."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if end >= 0:
        return end + 4
    if len(buf) > MAX_HEAD_BYTES:
        raise HeadersTooLargeError(
            f"request head is over {MAX_HEAD_BYTES} bytes (the limit for method, target "
            "and headers together)"
        )
    if _bare_lf(buf):
        raise BadRequestError("request head has a line ended by LF alone; end lines with CRLF")
    return -1


def parse_head(head: bytes) -> RequestHead:
    """Parse a complete request head (through the blank line) or raise an HttpError."""
    if len(head) > MAX_HEAD_BYTES + 4:
        raise HeadersTooLargeError(f"request head is over {MAX_HEAD_BYTES} bytes")
    fast = _FAST_HEAD.fullmatch(head)
    if fast is not None:  # a well-formed head in two regex calls
        method = fast.group(1).decode("ascii")
        target = fast.group(2).decode("ascii")
        version = "HTTP/1.1" if fast.group(3) == b"1" else "HTTP/1.0"
        fields = []
        for line in fast.group(4).split(b"\r\n")[:-1]:  # validated: split, do not search
            name, _, value = line.partition(b":")
            fields.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    else:  # find what is wrong, line by line, to say so
        method, target, version, fields = _parse_slowly(head)
    if len(fields) > MAX_HEADERS:
        raise HeadersTooLargeError(f"{len(fields)} header fields; the limit is {MAX_HEADERS}")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    for name, value in fields:
        if name == "content-length":
            lengths.add(value)
        if name in headers:
            if name in ("host", "authorization", "content-type", "content-length"):
                if name == "content-length" or headers[name] == value:
                    continue
                raise BadRequestError(f"header {name} is given twice with different values")
            headers[name] = f"{headers[name]}, {value}"  # RFC 9110 5.3: a list
        else:
            headers[name] = value
    if version == "HTTP/1.1" and "host" not in headers:
        raise BadRequestError("an HTTP/1.1 request needs a Host header (RFC 9112 3.2)")
    if "transfer-encoding" in headers:
        codings = [c.strip().lower() for c in headers["transfer-encoding"].split(",")]
        if "chunked" in codings:
            raise LengthRequiredError("chunked bodies are not accepted; send Content-Length")
        raise NotImplementedCodingError(
            f"Transfer-Encoding {headers['transfer-encoding'][:60]!r} is not supported; "
            "send the body as is with Content-Length"
        )
    length = _content_length(lengths)
    expect = headers.get("expect")
    expect_continue = False
    if expect is not None and version == "HTTP/1.1":  # RFC 9110 10.1.1: ignore it in 1.0
        if expect.lower() != "100-continue":
            raise ExpectationFailedError(
                f"Expect {expect[:60]!r} is not supported; only 100-continue is"
            )
        expect_continue = True
    path = target.split("?", 1)[0]
    return RequestHead(method, target, path, version, headers, length, expect_continue)


def _parse_slowly(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    if _bare_lf(head):
        raise BadRequestError("request head has a line ended by LF alone; end lines with CRLF")
    lines = head.split(b"\r\n")
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise BadRequestError("empty request head")
    method, target, version = _request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise HeadersTooLargeError(f"{len(lines) - 1} header fields; the limit is {MAX_HEADERS}")
    return method, target, version, [_field(line) for line in lines[1:]]


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequestError(
            f"malformed request line {_show(line)}; expected METHOD TARGET HTTP/1.1"
        )
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise BadRequestError(f"malformed HTTP version {_show(version)} in the request line")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise VersionNotSupportedError(
            f"HTTP version {version.decode()} is not supported; use HTTP/1.1 or HTTP/1.0"
        )
    if _TOKEN.fullmatch(method) is None:
        raise BadRequestError(f"malformed method {_show(method)}")
    if _TARGET.fullmatch(target) is None:
        raise BadRequestError(
            f"malformed request target {_show(target)}; expected a path starting with /"
        )
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _field(line: bytes) -> tuple[str, str]:
    match = _FIELD_LINE.fullmatch(line)
    if match is not None:  # the common case, in one regex
        return match.group(1).decode("ascii").lower(), match.group(2).decode("latin-1")
    if line[:1] in (b" ", b"\t"):
        raise BadRequestError(f"folded header line {_show(line)} (obs-fold) is not accepted")
    name, sep, _ = line.partition(b":")
    if not sep:
        raise BadRequestError(f"malformed header line {_show(line)}; expected Name: value")
    if _TOKEN.fullmatch(name) is None:
        raise BadRequestError(f"malformed header name {_show(name)}")
    raise BadRequestError(f"header {name.decode()} has a control character in its value")


def _content_length(values: set[str]) -> int:
    if not values:
        return 0
    if len(values) > 1:
        raise BadRequestError(
            f"Content-Length is given with different values ({', '.join(sorted(values))[:80]})"
        )
    value = next(iter(values))
    if _DIGITS.fullmatch(value) is None:
        raise BadRequestError(f"Content-Length {value[:40]!r} is not a plain decimal number")
    if len(value) > _MAX_LENGTH_DIGITS:
        return _OVER_ANY_LIMIT  # over any limit; refused as too large by the caller
    return int(value)


def _show(data: bytes) -> str:
    return repr(data[:80].decode("latin-1"))


# ----------------------------------------------------------------- responses

Response = tuple[int, bytes, dict[str, str]]


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    h = {"content-type": "application/json"}
    h.update(headers or {})
    return status, json.dumps(body, separators=(",", ":")).encode(), h


def error_response(exc: ServingError) -> Response:
    extra = exc.headers if isinstance(exc, HttpError) else {}
    if exc.status == 503:
        extra = {"retry-after": "1", **extra}
    return json_response(exc.status, {"error": exc.message, "code": exc.code}, extra)


def encode(response: Response, keep: bool, head_only: bool = False) -> bytes:
    """The bytes of a response; `head_only` for HEAD (same headers, no body)."""
    status, body, headers = response
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if not keep:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
