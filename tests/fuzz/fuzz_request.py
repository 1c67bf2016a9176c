"""Fuzz the local API's request-head parser and KServe decoder with atheris.

Contract: whatever the bytes, `find_head_end`/`parse_head` return a head or raise a
ServingError (the API's error root), and `decode_request` returns arrays or raises
BadRequestError. Anything else (KeyError, RecursionError, a numpy error...) is a bug.

    python tests/fuzz/fuzz_request.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris
import numpy  # noqa: F401  (imported first, uninstrumented: only the parsers are traced)

import agent.bundle  # noqa: F401
from agent.errors import BadRequestError, ServingError

with atheris.instrument_imports():
    from agent.api import http, kserve


def one_input(data: bytes) -> None:
    # The same bytes as a request head and, after it, as an infer body.
    end = -1
    try:
        end = http.find_head_end(data)
        if end >= 0:
            head = http.parse_head(data[:end])
            assert head.content_length >= 0
            assert head.version in ("HTTP/1.0", "HTTP/1.1")
            assert head.path.startswith("/")
    except ServingError as exc:
        assert exc.message and 400 <= exc.status < 600
    body = data[end:] if end >= 0 else data
    split = None
    if len(body) > 2 and body[0] == 0x01:  # a binary-extension body: header length next
        split, body = body[1], body[2:]
    try:
        request, arrays = kserve.decode_request(body, split)
        kserve.wants_binary(request)
        kserve.selected_outputs(request)
        for array in arrays.values():
            assert array.ndim <= kserve.MAX_DIMENSIONS
    except BadRequestError as exc:
        assert exc.message


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
