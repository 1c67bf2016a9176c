"""Fixtures of the update system tests: the rig and the bundle variants."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.helpers import SampleParts
from tests.update_rig import Bundles, Rig, update_rig


@pytest.fixture(scope="session")
def bundles(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> Bundles:
    return Bundles(sample_parts, demo_key, tmp_path_factory.mktemp("bundles"))


@pytest.fixture
def rig(tmp: Path) -> Iterator[Rig]:
    with update_rig(tmp) as r:
        yield r
