from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundle import remove_unpacked
from agent.signing import load_private_key
from tests.helpers import DEMO_KEY, SampleParts, unpack_sample


@pytest.fixture(scope="session")
def sample_parts(tmp_path_factory: pytest.TempPathFactory) -> SampleParts:
    return unpack_sample(tmp_path_factory.mktemp("sample") / "digits")


@pytest.fixture(scope="session")
def demo_key() -> Ed25519PrivateKey:
    return load_private_key(DEMO_KEY)


@pytest.fixture
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp paths can be longer.
    path = Path(tempfile.mkdtemp(prefix="er-", dir="/tmp"))
    yield path
    remove_unpacked(path)
