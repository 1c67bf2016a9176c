"""The shared-memory registry in process: races with unregister, accounting, mappings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from agent.api.bodies import BodyBudget
from agent.api.http import Caller
from agent.api.shm import SharedMemoryRegistry, ShmForbiddenError, ShmNotFoundError
from agent.config.model import MemoryConfig
from agent.memory import RssWatcher, compute_budget

ME = Caller(uid=os.geteuid(), tcp=False)


@pytest.fixture
def budget() -> BodyBudget:
    watcher = RssWatcher(compute_budget(MemoryConfig(max_mb=2048)), 0.1)
    return BodyBudget(watcher, 64 << 20)


def _object(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return "/" + name


def test_a_region_unregistered_under_a_request_is_a_clear_refusal(
    tmp_path: Path, budget: BodyBudget
) -> None:
    registry = SharedMemoryRegistry(budget, 4, 1 << 20, root=tmp_path)
    key = _object(tmp_path, "obj", np.arange(16, dtype=np.float32).tobytes())
    registry.register("r", {"key": key, "byte_size": 64}, ME)
    params = {"shared_memory_region": "r", "shared_memory_byte_size": 64}
    array = registry.read(params, "inputs[0]", np.dtype(np.float32), 16)
    assert array.tolist() == list(range(16))
    region = registry.get("r", "inputs[0]")
    # Unregistered while `array` still views the mapping: it stays readable.
    registry.unregister("r")
    assert array.tolist() == list(range(16))
    del array
    # A request that resolved the region just before the unregister: refused, no 500.
    region.close()  # what unregister does once no view holds the mapping
    with pytest.raises(ShmNotFoundError, match="just unregistered"):
        region.span(0, 64, "inputs[0]")
    with pytest.raises(ShmNotFoundError):
        registry.read(params, "inputs[0]", np.dtype(np.float32), 16)


def test_bytes_are_pinned_against_the_headroom_until_unregistered(
    tmp_path: Path, budget: BodyBudget
) -> None:
    registry = SharedMemoryRegistry(budget, 4, 8 << 20, root=tmp_path)
    key = _object(tmp_path, "obj", bytes(3 << 20))
    registry.register("a", {"key": key, "byte_size": 1 << 20}, ME)
    registry.register("b", {"key": key, "byte_size": 2 << 20, "offset": 1 << 20}, ME)
    assert budget.pinned == 3 << 20 and registry.total_bytes == 3 << 20 and len(registry) == 2
    registry.unregister("a")
    assert budget.pinned == 2 << 20
    registry.unregister(None)
    assert budget.pinned == 0 and registry.total_bytes == 0 and registry.status(None) == []


def test_outputs_land_in_the_region_and_a_tcp_caller_without_token_is_refused(
    tmp_path: Path, budget: BodyBudget
) -> None:
    registry = SharedMemoryRegistry(budget, 4, 1 << 20, root=tmp_path)
    key = _object(tmp_path, "out", bytes(4096 + 40))
    registry.register("o", {"key": key, "byte_size": 40, "offset": 4096}, ME)  # past a page
    region, offset, size = registry.target(
        {"shared_memory_region": "o", "shared_memory_byte_size": 40}, "outputs[0]"
    )
    values = np.arange(10, dtype=np.float32)
    params = registry.write(region, offset, size, values, "y")
    assert params == {"shared_memory_region": "o", "shared_memory_byte_size": 40}
    assert np.frombuffer((tmp_path / "out").read_bytes()[4096:], np.float32).tolist() == list(
        range(10)
    )
    tcp = Caller(uid=None, tcp=True)
    with pytest.raises(ShmForbiddenError, match="api.token"):
        registry.register("t", {"key": key, "byte_size": 8}, tcp)
    with pytest.raises(ShmForbiddenError):
        registry.access(tcp).read(
            {"shared_memory_region": "o"}, "inputs[0]", np.dtype(np.float32), 10
        )
    registry.tcp_allowed = True  # a token is set: the agent's own objects only
    registry.register("t", {"key": key, "byte_size": 8}, tcp)
    registry.close()
