"""The manifest's rules: one ASCII rule for names/versions/paths, bounded JSON, typed fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import bundle as B
from agent import strictjson
from agent.names import NameRuleError, check_name, is_name, path_problem
from agent.signing import load_public_key
from agent.version import VersionFormatError, compare_versions, parse_version
from tests.helpers import DEMO_PUB, SampleParts, make_bundle

DEMO = load_public_key(DEMO_PUB)


@pytest.mark.parametrize("name", ["digits", "a", "Model_2.v-1", "9lives", "x" * 64])
def test_names_the_rule_takes(name: str) -> None:
    assert is_name(name) and check_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "-x", ".hidden", "a/b", "digits\n", "digit\u0455", "digits\u0663",
     "d\u00efgits", "x" * 65, "a b", 7, None],
)  # fmt: skip
def test_names_the_rule_refuses(name: Any) -> None:
    assert not is_name(name)
    with pytest.raises(NameRuleError, match="ASCII"):
        check_name(name)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("model.onnx", None),
        ("golden/outputs-onnx.npz", None),
        ("a/" * 99 + "b", None),  # 199 bytes
        ("a/" * 100 + "b", "the cap is 200"),
        ("d" * 101, "component"),
        ("p" * 5000, "the cap is 200"),
        ("../x", "climbs out"),
        ("/etc/passwd", "absolute"),
        ("a/./b", "normalized"),
        ("a//b", "normalized"),
        ("a/", "normalized"),
        ("r\u00ebport.md", "ASCII"),
        ("a b", "ASCII"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
    ],
)
def test_the_archive_path_rule(path: str, why: str | None) -> None:
    problem = path_problem(path)
    assert (problem is None) if why is None else (problem is not None and why in problem)


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.0.1", "1.0.0", 1),
        ("1.0.0", "1.0.0-rc1", 1),
        ("1.0.0-rc1", "1.0.0-rc2", -1),
        ("1.0.0-rc.9", "1.0.0-rc.10", -1),
        ("1.0.0-rc.1", "1.0.0-rc.a", -1),
        ("1.0.0-rc", "1.0.0-rc.1", -1),
        ("1.0.0-alpha", "1.0.0-beta", -1),
        ("1.0.0+build7", "1.0.0", 0),  # build metadata does not order
        ("1.0.0+b2", "1.0.0+b1", 0),
        ("1.0.0-rc1+b9", "1.0.0-rc1", 0),
        ("1.0", "1.0.0.0", 0),
        ("2", "1.99.99.99", 1),
        ("01.0.0", "1.0.0", 0),
    ],
)
def test_version_order(a: str, b: str, order: int) -> None:
    assert compare_versions(a, b) == order
    assert compare_versions(b, a) == -order


@pytest.mark.parametrize(
    "text",
    ["\u0661.\u0660.\u0662", "1.0.\u0662", "\uff11.0.0", "1.0.\u00b2", "1.0.0\n", " 1.0.0",
     "1.0.0+", "1.0.0-", "1.0.0.0.0", "1234567890.0", "1.0.0-" + "a" * 64, "", "v1.0", 1],
)  # fmt: skip
def test_versions_the_rule_refuses(text: Any) -> None:
    with pytest.raises(VersionFormatError, match="MAJOR"):
        parse_version(text)


def test_bounded_json_measures_depth_without_recursion() -> None:
    assert strictjson.nesting_depth('{"a": [1, {"b": "[[[["}]}') == 3
    assert strictjson.nesting_depth("[" * 1_000_000) == 1_000_000
    with pytest.raises(strictjson.JsonRefusedError, match="1000000 levels deep; the cap is 32"):
        strictjson.loads(b"[" * 1_000_000 + b"]" * 1_000_000, "m")
    assert strictjson.loads(b"[" * 32 + b"]" * 32, "m") is not None


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"a": 1, "a": 2}', "appears twice"),
        (b'{"a": NaN}', "NaN is not a JSON number"),
        (b'{"a": -Infinity}', "not a JSON number"),
        (b'{"a": 1e400}', "out of range"),
        (b'{"a": 1' + b"0" * 30 + b"}", "31 digits"),
        (b'{"a": "\\udc00"}', "surrogate"),
        (b'{"a": "\xff"}', "not UTF-8"),
        (b'"\\' * 50_000, "not valid JSON"),
    ],
)
def test_bounded_json_refuses(data: bytes, why: str) -> None:
    with pytest.raises(strictjson.JsonRefusedError, match=why):
        strictjson.loads(data, "m")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"golden": {"inputs": ["golden/inputs.npz"]}}, "golden.inputs is list"),
        ({"golden": "x"}, "golden is str"),
        ({"figures": {"peak_memory_mb": {"onnxruntime": 0.001}}}, r"0.001.*\[1, "),
        ({"figures": {"peak_memory_mb": {"onnxruntime": -5}}}, "finite number"),
        ({"figures": {"peak_memory_mb": {"onnxruntime": 2e6}}}, "finite number"),
        ({"inputs": [{"name": "input", "dtype": "float32", "shape": [2**40]}]}, "from -1"),
        ({"outputs": [{"name": "l\n", "dtype": "float32", "shape": [1]}]}, "printable"),
        ({"labels": [1, 2]}, "labels"),
        ({"name": ".."}, "name '..'"),
        ({"min_agent_version": "\u0661.0"}, "min_agent_version"),
    ],
)
def test_validly_signed_malformed_fields_are_refused(
    sample_parts: SampleParts, tmp: Path, change: dict[str, Any], pattern: str
) -> None:
    body = {**sample_parts.manifest, **change}
    with pytest.raises(B.SchemaError, match=pattern):
        B.parse_manifest(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("tolerance", "error"),
    [
        ({"atol": 0.0, "rtol": 0.0}, None),
        ({"atol": 1.5, "rtol": B.MAX_RTOL}, None),  # the sample's golden logits reach 17.8
        ({"atol": 1e308, "rtol": 0.0}, B.SchemaError),
        ({"atol": "0.001", "rtol": 0.0}, B.SchemaError),
        ({"atol": 0.0, "rtol": B.MAX_RTOL * 2}, B.SchemaError),
        ({"atol": -1e-9, "rtol": 0.0}, B.SchemaError),
        ({"atol": 2.0, "rtol": 0.0}, B.GoldenFileError),  # over 10% of 17.8
    ],
)
def test_tolerances_are_finite_and_capped(
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
    tolerance: dict[str, Any],
    error: type[Exception] | None,
) -> None:
    golden = {**sample_parts.manifest["golden"], "tolerance": tolerance}
    if error is None:
        path = make_bundle(sample_parts, tmp / "x.edgebundle", demo_key, golden=golden)
        m = B.verify_bundle(path, [DEMO]).manifest
        assert (m.golden_atol, m.golden_rtol) == (tolerance["atol"], tolerance["rtol"])
    else:
        with pytest.raises(error, match="tolerance"):
            make_bundle(sample_parts, tmp / "x.edgebundle", demo_key, golden=golden)


def test_a_file_and_a_folder_of_the_same_name_are_refused_before_unpack(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    (tmp / "golden").write_bytes(b"x")
    with pytest.raises(B.SchemaError, match="as a file and as the folder"):
        make_bundle(
            sample_parts,
            tmp / "x.edgebundle",
            demo_key,
            files={**sample_parts.files(), "golden": tmp / "golden"},
        )
