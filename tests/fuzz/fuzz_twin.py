"""Fuzz the KubeEdge twin decoder (the bytes a twin delta or get result carries).

Contract: `agent.protocol.twin.decode` returns a TwinDocument whose values are strings
KubeEdge accepts (under 512 bytes, valid property names), or raises ProtocolError
with a message. Anything else is a bug.

    python tests/fuzz/fuzz_twin.py -runs=100000
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from agent.protocol import messages, twin


def one_input(data: bytes) -> None:
    try:
        doc = twin.decode(data)
    except messages.ProtocolError as exc:
        assert exc.message and exc.code == messages.Code.MALFORMED
        return
    for values in (doc.expected, doc.actual, doc.delta, doc.desired()):
        for prop, value in values.items():
            assert twin.check_value(prop, value) == value
    messages.dumps(doc.desired())  # goes into the retained state: must encode


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
