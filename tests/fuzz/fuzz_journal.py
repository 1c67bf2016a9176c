"""Fuzz the update journal reader (agent.update.journal.parse_journal): the bytes of
STATE/update.json (torn by a disk fault, edited by hand) in, a JournalState or a
ValueError out, nothing else; what it returns must write back and read back the same.

    python tests/fuzz/fuzz_journal.py -runs=100000
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from agent.update.journal import parse_journal


def test_one(data: bytes) -> None:
    try:
        state = parse_journal(data)
    except ValueError:
        return
    again = parse_journal(json.dumps(state.to_json()).encode())
    if again != state:
        raise AssertionError(f"does not read back: {state!r} vs {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
