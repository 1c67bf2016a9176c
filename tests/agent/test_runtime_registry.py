"""A runtime is one module: a throwaway runtime, installed as a separate package that
declares an `edgerun.runtimes` entry point, is registered, configurable under
`[runtimes.<name>]`, selectable by `model.runtime`, tunable over the link and probed,
with no edit anywhere in the agent. It runs in a child process, as the registry and
the config types are built when the agent is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.runtimes import DEFAULT_PREFERENCE, REGISTRY, register, runtime_for_format
from agent.runtimes.base import Runtime
from tests.helpers import ROOT, SampleParts

TOY_MODULE = '''
"""A runtime that runs ONNX models with onnxruntime's CPU provider and scales the outputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from agent.config.typed import constraint
from agent.runtimes.base import Runtime


@dataclass(frozen=True)
class ToyConfig:
    gain: float = constraint(1.0, ge=0.0, le=10.0)
    label: str = "toy"


class ToyRuntime(Runtime):
    name: ClassVar[str] = "toy"
    format: ClassVar[str] = "onnx"
    platform: ClassVar[str] = "toy_onnx"
    config_type: ClassVar[type[Any]] = ToyConfig
    tunable: ClassVar[tuple[str, ...]] = ("gain",)
    readable: ClassVar[tuple[str, ...]] = ("label",)

    def __init__(self, model_path, inputs, outputs, config=None):
        super().__init__(model_path, inputs, outputs)
        import onnxruntime as ort

        self.config = config or ToyConfig()
        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    @classmethod
    def unavailable_reason(cls):
        return None

    @classmethod
    def library_version(cls):
        return "toy 0.1"

    def run(self, feeds):
        names = [s.name for s in self.outputs]
        out = self.session.run(names, feeds)
        return {n: o * self.config.gain for n, o in zip(names, out)}
'''

SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from agent.bundle import load_unpacked
from agent.config.loader import parse_config
from agent.config.typed import ConfigError
from agent.link.readable import READABLE
from agent.link.tunables import TUNABLE, validate
from agent.probe import measure
from agent.runtimes import DEFAULT_PREFERENCE, REGISTRY, choose_runtime, load_runtime

directory = Path(sys.argv[1])
out = {"registry": list(REGISTRY), "preference": list(DEFAULT_PREFERENCE)}
config = parse_config(
    {"model": {"runtime": "toy", "preference": ["toy"]}, "runtimes": {"toy": {"gain": 2.0}}},
    environ={},
)
out["gain"] = config.runtimes.toy.gain
out["default_model_preference"] = list(parse_config({}, environ={}).model.preference)
issues = []
for bad in ({"runtimes": {"toy": {"gain": -1}}}, {"model": {"runtime": "nosuch"}}):
    try:
        parse_config(bad, environ={})
    except ConfigError as exc:
        issues += [str(i) for i in exc.issues]
out["issues"] = issues
manifest = load_unpacked(directory)
name = choose_runtime(manifest, config.model.runtime, list(config.model.preference))
toy = load_runtime(name, manifest, directory, config.runtimes)
ort = load_runtime("onnxruntime", manifest, directory, config.runtimes)
with np.load(directory / manifest.golden_inputs) as data:
    feeds = {k: data[k] for k in data.files}
a, b = toy.run(feeds)["logits"], ort.run(feeds)["logits"]
out["chosen"] = name
out["platform"] = toy.platform
out["scaled"] = bool(np.allclose(a, 2.0 * b, rtol=1e-5, atol=1e-6))
out["tunable"] = [k for k in TUNABLE if ".toy." in k]
out["readable"] = [k for k in READABLE if ".toy." in k]
out["set_gain"] = validate("runtimes.toy.gain", 3)
figures, produced = measure("toy", directory / manifest.formats["onnx"],
                            manifest.inputs, manifest.outputs, feeds, 1, 3)
out["probe_runtime"] = figures["runtime"]
print(json.dumps(out))
"""


def _install_toy(site: Path) -> None:
    (site / "toyrt.py").write_text(TOY_MODULE)
    dist = site / "toy_runtime-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-runtime\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[edgerun.runtimes]\ntoy = toyrt:ToyRuntime\n")


def test_a_runtime_module_from_a_plugin_needs_no_other_edit(
    sample_parts: SampleParts, tmp_path: Path
) -> None:
    _install_toy(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(sample_parts.directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["registry"] == ["onnxruntime", "litert", "toy"]
    assert out["preference"] == ["onnxruntime", "litert", "toy"]
    assert out["default_model_preference"] == ["onnxruntime", "litert", "toy"]
    assert out["gain"] == 2.0
    assert out["issues"] == [
        "runtimes.toy.gain: -1.0 is below the minimum 0.0 (allowed: 0 to 10)",
        "model.runtime: 'nosuch' is not allowed; choose one of 'auto', 'onnxruntime', 'litert', "
        "'toy'",
    ]
    assert out["chosen"] == "toy" and out["platform"] == "toy_onnx" and out["scaled"]
    assert out["tunable"] == ["runtimes.toy.gain"]
    assert out["readable"] == ["runtimes.toy.gain", "runtimes.toy.label"]
    assert out["set_gain"] == 3
    assert out["probe_runtime"] == "toy"


def test_a_broken_plugin_is_left_out_and_logged(tmp_path: Path) -> None:
    dist = tmp_path / "broken_runtime-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-runtime\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[edgerun.runtimes]\nbroken = no_such_module:X\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = "from agent.runtimes import REGISTRY; print(sorted(REGISTRY))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['litert', 'onnxruntime']"
    assert "runtime plugin broken (no_such_module:X) does not load" in done.stderr


def test_register_refuses_a_runtime_missing_a_declaration_or_a_taken_name() -> None:
    class NoPlatform(Runtime):
        name = "noplat"
        format = "onnx"

    with pytest.raises(TypeError, match="does not declare platform"):
        register(NoPlatform)  # type: ignore[type-abstract]

    class Clash(Runtime):
        name = "onnxruntime"
        format = "onnx"
        platform = "x"
        config_type = dict

    with pytest.raises(TypeError, match="taken by OrtRuntime"):
        register(Clash)  # type: ignore[type-abstract]
    assert list(REGISTRY) == list(DEFAULT_PREFERENCE) == ["onnxruntime", "litert"]


def test_builtin_runtimes_declare_their_platform_and_sections() -> None:
    assert {n: c.platform for n, c in REGISTRY.items()} == {
        "onnxruntime": "onnxruntime_onnx",
        "litert": "tflite",
    }
    assert runtime_for_format("onnx") == "onnxruntime"
    assert runtime_for_format("tflite") == "litert"
    with pytest.raises(KeyError, match="no registered runtime runs pte models"):
        runtime_for_format("pte")
