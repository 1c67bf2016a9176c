"""Shared fixtures: a signing key and a fast recipe folder built from fixtures/tiny.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.signing import generate_keypair
from tests.export.pipeline_helpers import FAST_RECIPE, write_recipe


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("keys")
    generate_keypair(folder / "test.key", folder / "test.pub")
    return folder / "test.key", folder / "test.pub"


@pytest.fixture
def recipe_dir(tmp_path: Path) -> Callable[..., Path]:
    def make(changes: dict[str, str] | None = None, text: str = FAST_RECIPE) -> Path:
        return write_recipe(tmp_path / "recipe", changes, text)

    return make
