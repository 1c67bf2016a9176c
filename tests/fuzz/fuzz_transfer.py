"""Fuzz the MQTT transfer decoders: chunks (device side) and need messages (console side).

Contract: `decode_chunk` returns a Chunk whose payload has exactly the length its
layout says, whose index is inside its total and whose re-encoding is the input;
`decode_need` returns a Need whose ranges lie inside its total. Anything else they
do is raise TransferError with a reason and a message. The first byte picks the
decoder.

    python tests/fuzz/fuzz_transfer.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from agent.protocol import transfer


def one_input(data: bytes) -> None:
    if not data:
        return
    body = data[1:]
    try:
        if data[0] & 1:
            need = transfer.decode_need(body)
            assert need.total is not None or not need.missing
            for start, end in need.missing:
                assert need.total is not None and 0 <= start < end <= need.total
            assert transfer.decode_need(need.encode()) == need
        else:
            chunk = transfer.decode_chunk(body)
            assert 0 <= chunk.index < chunk.total
            want = transfer.expected_length(
                chunk.index, chunk.total, chunk.chunk_size, chunk.bundle_size
            )
            assert len(chunk.payload) == want
            assert chunk.offset + len(chunk.payload) <= chunk.bundle_size
            assert chunk.encode() == body
    except transfer.TransferError as exc:
        assert exc.reason and exc.message


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
