"""Fuzz the release index parser (the bytes `update.repository` serves).

Contract: `agent.update.index.parse_index` returns a ReleaseIndex whose every release
would pass `DeployRequest.from_args`, or raises UpdateError with an `update.index_*`
code and a message. Anything else is a bug. The trusted key is fixed, so the fuzzer
can only reach the signed part's checks with seeds signed by it (tests/fuzz/
test_fuzz_index.py signs its seeds; mutations of them mostly test the signature path).

    python tests/fuzz/fuzz_index.py -runs=100000
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import atheris
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

with atheris.instrument_imports():
    from agent.update.errors import UpdateCode, UpdateError
    from agent.update.index import parse_index

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = datetime(2026, 1, 1, tzinfo=UTC)
CODES = {UpdateCode.INDEX_INVALID, UpdateCode.INDEX_EXPIRED}


def one_input(data: bytes) -> None:
    try:
        index = parse_index(data, [KEY.public_key()], NOW)
    except UpdateError as exc:
        assert exc.code in CODES, exc.code
        assert exc.message
        return
    assert index.expires > NOW
    for release in index.releases:
        request = release.deploy_request("poll")
        assert request.sha256 == release.sha256 and request.size == release.size


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
