"""The bundle format: a good bundle round-trips; every hostile one is refused by its rule."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import bundle as B
from agent.signing import key_id, load_public_key
from tests.helpers import (
    DEMO_PUB,
    SAMPLE_BUNDLE,
    SampleParts,
    file_info,
    make_bundle,
    raw_tar,
    signed_manifest,
)

DEMO = load_public_key(DEMO_PUB)


def test_sample_bundle_verifies_and_unpacks(tmp: Path) -> None:
    verified = B.verify_bundle(SAMPLE_BUNDLE, [DEMO])
    m = verified.manifest
    assert m.name == "digits" and m.version == "1.0.0"
    assert set(m.formats) == {"onnx", "tflite"}
    assert m.inputs[0].name == "input" and m.inputs[0].shape == (-1, 1, 8, 8)
    assert m.peak_memory_mb["onnxruntime"] > 0 and m.peak_memory_mb["litert"] > 0
    assert verified.signer == key_id(DEMO)
    out = B.unpack_bundle(SAMPLE_BUNDLE, tmp / "u", [DEMO])
    assert out.directory == tmp / "u"
    for name in m.files:
        path = tmp / "u" / name
        assert path.is_file() and not path.stat().st_mode & 0o222, name  # read-only
    assert B.load_unpacked(tmp / "u").version == "1.0.0"


def test_write_then_verify_round_trip(sample_parts: SampleParts, tmp: Path) -> None:
    key = Ed25519PrivateKey.generate()
    out = make_bundle(sample_parts, tmp / "b.edgebundle", key, version="2.0.0")
    verified = B.verify_bundle(out, [DEMO, key.public_key()])
    assert verified.manifest.version == "2.0.0"
    assert verified.signer == key_id(key.public_key())
    assert not list(tmp.glob(".bundle-*")), "temporary file left behind"


# --------------------------------------------------------------------------- hostile


def _manifest(parts: SampleParts, **changes: object) -> dict[str, object]:
    m = dict(parts.manifest)
    m.update(changes)
    return m


def _members(
    parts: SampleParts, names: list[str] | None = None
) -> list[tuple[tarfile.TarInfo, bytes]]:
    names = names if names is not None else list(parts.manifest["files"])
    return [file_info(n, (parts.directory / n).read_bytes()) for n in names]


def test_bad_signature_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    # Tamper with the manifest after signing: a bigger accuracy figure, same key id.
    tampered = json.loads(members[0][1])
    tampered["version"] = "9.9.9"
    data = (json.dumps(tampered, indent=2, sort_keys=True) + "\n").encode()
    members[0] = file_info("manifest.json", data)
    path = raw_tar(tmp / "x.edgebundle", members + _members(sample_parts))
    with pytest.raises(B.SignatureError, match="altered"):
        B.verify_bundle(path, [DEMO])


def test_signature_by_untrusted_key_is_refused(
    sample_parts: SampleParts, other_key: Ed25519PrivateKey, tmp: Path
) -> None:
    path = make_bundle(sample_parts, tmp / "x.edgebundle", other_key)
    with pytest.raises(B.UntrustedSignerError, match=key_id(other_key.public_key())):
        B.verify_bundle(path, [DEMO])


def test_missing_signature_is_refused(sample_parts: SampleParts, tmp: Path) -> None:
    data = json.dumps(sample_parts.manifest).encode()
    path = raw_tar(
        tmp / "x.edgebundle", [file_info("manifest.json", data), *_members(sample_parts)]
    )
    with pytest.raises(B.MissingManifestError, match="before a signed manifest"):
        B.verify_bundle(path, [DEMO])
    path = raw_tar(tmp / "y.edgebundle", [file_info("manifest.json", data)])
    with pytest.raises(B.SignatureError, match="no manifest.sig"):
        B.verify_bundle(path, [DEMO])


def test_no_trusted_keys_is_refused(tmp: Path) -> None:
    with pytest.raises(B.UntrustedSignerError, match="no trusted public keys"):
        B.verify_bundle(SAMPLE_BUNDLE, [])


def test_wrong_hash_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    files = _members(sample_parts)
    idx = next(i for i, (info, _) in enumerate(files) if info.name == "model.onnx")
    info, data = files[idx]
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    files[idx] = file_info("model.onnx", bytes(flipped))
    path = raw_tar(tmp / "x.edgebundle", members + files)
    with pytest.raises(B.HashMismatchError, match="model.onnx"):
        B.verify_bundle(path, [DEMO])


def test_wrong_size_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    files = _members(sample_parts)
    files = [file_info(i.name, d + b"\0") if i.name == "model.onnx" else (i, d) for i, d in files]
    path = raw_tar(tmp / "x.edgebundle", members + files)
    with pytest.raises(B.SizeMismatchError, match="model.onnx"):
        B.verify_bundle(path, [DEMO])


def test_extra_file_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    path = raw_tar(
        tmp / "x.edgebundle", members + _members(sample_parts) + [file_info("evil.sh", b"rm -rf /")]
    )
    with pytest.raises(B.UnlistedFileError, match="evil.sh"):
        B.verify_bundle(path, [DEMO])


def test_missing_file_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    names = [n for n in sample_parts.manifest["files"] if n != "model.tflite"]
    path = raw_tar(tmp / "x.edgebundle", members + _members(sample_parts, names))
    with pytest.raises(B.MissingFileError, match="model.tflite"):
        B.verify_bundle(path, [DEMO])


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("../escape.txt", "climbs out"),
        ("golden/../../escape.txt", "climbs out"),
        ("/etc/passwd", "absolute path"),
        ("./model.onnx", "normalized"),
        ("a//b", "normalized"),
    ],
)
def test_unsafe_paths_are_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path, name: str, pattern: str
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    path = raw_tar(tmp / "x.edgebundle", [*members, file_info(name, b"x")])
    with pytest.raises(B.UnsafeMemberError, match=pattern):
        B.verify_bundle(path, [DEMO])
    assert not (tmp.parent / "escape.txt").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_are_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path, kind: bytes
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    link = tarfile.TarInfo("model.onnx")
    link.type = kind
    link.linkname = "/etc/shadow" if kind == tarfile.SYMTYPE else "manifest.json"
    path = raw_tar(tmp / "x.edgebundle", [*members, (link, None)])  # type: ignore[list-item]
    with pytest.raises(B.UnsafeMemberError, match="link"):
        B.unpack_bundle(path, tmp / "u", [DEMO])
    assert not (tmp / "u").exists()


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_devices_are_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path, kind: bytes
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    dev = tarfile.TarInfo("model.onnx")
    dev.type = kind
    dev.devmajor, dev.devminor = 1, 3
    path = raw_tar(tmp / "x.edgebundle", [*members, (dev, None)])  # type: ignore[list-item]
    with pytest.raises(B.UnsafeMemberError, match="device or fifo"):
        B.verify_bundle(path, [DEMO])


def test_oversized_member_is_refused(tmp: Path) -> None:
    limits = B.Limits(max_member_bytes=16 * 1024)  # the sample's INT8 model.onnx is 31 KiB
    with pytest.raises(B.OversizeError, match="model.onnx.*cap is 16384"):
        B.verify_bundle(SAMPLE_BUNDLE, [DEMO], limits)


def test_declared_size_above_cap_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    files = dict(sample_parts.manifest["files"])
    files["model.onnx"] = {**files["model.onnx"], "size": 10 * 1024**3}
    members = signed_manifest(_manifest(sample_parts, files=files), demo_key)
    path = raw_tar(tmp / "x.edgebundle", members + _members(sample_parts))
    with pytest.raises(B.OversizeError, match="declares 'model.onnx'"):
        B.verify_bundle(path, [DEMO])


def test_oversized_bundle_and_too_many_members_are_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    with pytest.raises(B.OversizeError, match="bundle is .* bytes; the cap is 1000"):
        B.verify_bundle(SAMPLE_BUNDLE, [DEMO], B.Limits(max_bundle_bytes=1000))
    with pytest.raises(B.OversizeError, match="more than 4 members"):
        B.verify_bundle(SAMPLE_BUNDLE, [DEMO], B.Limits(max_members=4))


def test_oversized_manifest_is_refused(tmp: Path) -> None:
    with pytest.raises(B.OversizeError, match="manifest.json"):
        B.verify_bundle(SAMPLE_BUNDLE, [DEMO], B.Limits(max_manifest_bytes=100))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_truncated_archive_is_refused(tmp: Path, cut: float) -> None:
    data = SAMPLE_BUNDLE.read_bytes()
    path = tmp / "cut.edgebundle"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(B.BundleFormatError, match="truncated|corrupt|not a tar"):
        B.unpack_bundle(path, tmp / "u", [DEMO])
    assert not (tmp / "u").exists()
    assert not list(tmp.glob(".unpack-*")), "half-unpacked directory left behind"


def test_not_a_tar_is_refused(tmp: Path) -> None:
    path = tmp / "junk.edgebundle"
    path.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(B.BundleFormatError, match="not a tar archive"):
        B.verify_bundle(path, [DEMO])


def test_missing_bundle_file_is_a_format_error(tmp: Path) -> None:
    with pytest.raises(B.BundleFormatError, match="cannot read bundle"):
        B.verify_bundle(tmp / "nope.edgebundle", [DEMO])


def test_unknown_schema_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(_manifest(sample_parts, schema="edgerun.bundle/99"), demo_key)
    path = raw_tar(tmp / "x.edgebundle", members + _members(sample_parts))
    with pytest.raises(B.SchemaError, match=r"edgerun.bundle/99.*edgerun.bundle/1"):
        B.verify_bundle(path, [DEMO])


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"version": "one"}, "version 'one'"),
        ({"name": "../x"}, "name"),
        ({"formats": {"pt": "model.onnx"}}, "format 'pt' is not one of onnx, tflite"),
        ({"formats": {"onnx": "nope.onnx"}}, "not in files"),
        ({"inputs": [{"name": "x", "dtype": "complex64", "shape": [1]}]}, "dtype 'complex64'"),
        ({"inputs": []}, "non-empty list"),
        ({"figures": {"peak_memory_mb": {"onnxruntime": "a lot"}}}, "peak_memory_mb"),
    ],
)
def test_malformed_manifest_fields_are_refused(
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
    change: dict[str, object],
    pattern: str,
) -> None:
    members = signed_manifest(_manifest(sample_parts, **change), demo_key)
    path = raw_tar(tmp / "x.edgebundle", members + _members(sample_parts))
    with pytest.raises(B.SchemaError, match=pattern):
        B.verify_bundle(path, [DEMO])


def test_duplicate_member_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    files = _members(sample_parts)
    path = raw_tar(tmp / "x.edgebundle", members + files + files[:1])
    with pytest.raises(B.UnsafeMemberError, match="twice"):
        B.verify_bundle(path, [DEMO])


def test_newer_agent_required_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    path = make_bundle(sample_parts, tmp / "x.edgebundle", demo_key, min_agent_version="99.0")
    with pytest.raises(B.IncompatibleAgentError, match="needs agent 99.0 or newer"):
        B.verify_bundle(path, [DEMO])


def test_unpack_refuses_existing_destination(tmp: Path) -> None:
    (tmp / "u").mkdir()
    with pytest.raises(FileExistsError):
        B.unpack_bundle(SAMPLE_BUNDLE, tmp / "u", [DEMO])


def test_writer_refuses_what_a_device_would_refuse(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    with pytest.raises(B.SchemaError):
        make_bundle(sample_parts, tmp / "x.edgebundle", demo_key, version="not-a-version")
    with pytest.raises(B.UnsafeMemberError):
        make_bundle(sample_parts, tmp / "y.edgebundle", demo_key, files={"../x": tmp / "x"})
    assert not list(tmp.glob("*.edgebundle")) and not list(tmp.glob(".bundle-*"))


# --------------------------------------------------------------------------- strict ustar


def _headers(data: bytes) -> list[bytes]:
    """Every header block of an archive written by write_bundle, in order."""
    out, pos = [], 0
    while data[pos : pos + 512] != bytes(512):
        block = data[pos : pos + 512]
        out.append(block)
        size = int(block[124:135], 8)
        pos += 512 + -(-size // 512) * 512
    assert data[pos:].count(0) == len(data) - pos, "only zeros after the end blocks"
    assert len(data) - pos >= 1024, "two zero end blocks"
    return out


def test_the_writer_writes_exactly_the_strict_subset(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    long = "report/" + "/".join(["n" * 40] * 3) + "/notes.md"  # 138 bytes: needs the prefix
    (tmp / "notes.md").write_bytes(b"# notes\n")
    files = {**sample_parts.files(), long: tmp / "notes.md"}
    path = make_bundle(sample_parts, tmp / "x.edgebundle", demo_key, files=files)
    headers = _headers(path.read_bytes())
    assert [h[156:157] for h in headers] == [b"0"] * len(headers)
    assert all(h[257:265] == b"ustar\x0000" for h in headers)
    assert B.verify_bundle(path, [DEMO]).manifest.files.keys() == files.keys()
    with tarfile.open(path) as tar:  # and any tar tool reads it the same
        assert [m.name for m in tar.getmembers()] == [
            "manifest.json",
            "manifest.sig",
            *sorted(files),
        ]
        assert all(m.isfile() and not m.pax_headers for m in tar.getmembers())


@pytest.mark.parametrize(
    ("name", "error"),
    [("a/" * 100 + "b", B.UnsafeMemberError), ("r\u00ebport.md", B.UnsafeMemberError)],
)
def test_the_writer_refuses_names_the_reader_would(
    sample_parts: SampleParts,
    demo_key: Ed25519PrivateKey,
    tmp: Path,
    name: str,
    error: type[Exception],
) -> None:
    (tmp / "f").write_bytes(b"x")
    with pytest.raises(error):
        make_bundle(
            sample_parts,
            tmp / "x.edgebundle",
            demo_key,
            files={**sample_parts.files(), name: tmp / "f"},
        )
    assert not list(tmp.glob("*.edgebundle"))


def test_a_directory_entry_for_a_listed_file_is_refused(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    members = signed_manifest(sample_parts.manifest, demo_key)
    folder = tarfile.TarInfo("model.tflite")
    folder.type = tarfile.DIRTYPE
    files = [m for m in _members(sample_parts) if m[0].name != "model.tflite"]
    path = raw_tar(tmp / "x.edgebundle", [*members, *files, (folder, None)])  # type: ignore[list-item]
    with pytest.raises(B.UnsafeMemberError, match="directory entry"):
        B.unpack_bundle(path, tmp / "u", [DEMO])
    assert not (tmp / "u").exists() and not list(tmp.glob(".unpack-*"))


@pytest.mark.parametrize(
    ("tail", "pattern"),
    [
        (b"", "without the two zero blocks"),
        (bytes(512), "without the two zero blocks"),
        (bytes(1024) + b"x", "data after its end"),
        (bytes(range(256)) * 2 + bytes(1024), "not a member header"),
        (bytes(512) + bytes(range(256)) * 2 + bytes(1024), "followed by data"),
    ],
)
def test_the_archive_must_end_cleanly(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path, tail: bytes, pattern: str
) -> None:
    data = make_bundle(sample_parts, tmp / "x.edgebundle", demo_key).read_bytes()
    body = data[: len(data) - 1024]  # write_bundle ends with exactly two zero blocks
    assert data[len(body) :] == bytes(1024)
    path = tmp / "y.edgebundle"
    path.write_bytes(body + tail)
    with pytest.raises(B.BundleFormatError, match=pattern):
        B.verify_bundle(path, [DEMO])


def test_a_refused_unpack_leaves_nothing_and_the_store_forgets_unlinked_bundles(
    sample_parts: SampleParts, demo_key: Ed25519PrivateKey, tmp: Path
) -> None:
    from agent.store import Store

    (tmp / "inputs.npz").write_bytes(b"PK\x05\x06" + bytes(18))  # a zip of no arrays
    files = {**sample_parts.files(), "golden/inputs.npz": tmp / "inputs.npz"}
    bad = tmp / "bad.edgebundle"
    # A buggy builder: the manifest is signed, the goldens are empty.
    members = signed_manifest(
        {
            **sample_parts.manifest,
            "files": {
                **sample_parts.manifest["files"],
                "golden/inputs.npz": {
                    "sha256": hashlib.sha256((tmp / "inputs.npz").read_bytes()).hexdigest(),
                    "size": 22,
                },
            },
        },
        demo_key,
    )
    raw_tar(
        bad, [*members, *[file_info(n, Path(p).read_bytes()) for n, p in sorted(files.items())]]
    )
    store = Store(tmp / "state")
    with pytest.raises(B.GoldenFileError, match="holds no arrays"):
        store.install(bad, [DEMO], B.Limits())
    assert sorted(p.name for p in store.bundles.iterdir()) == []
    # A directory no link names (an install the agent died in) is gone at the next start.
    good = store.install(SAMPLE_BUNDLE, [DEMO], B.Limits())
    assert good.directory is not None and good.directory.exists()
    Store(tmp / "state")
    assert not good.directory.exists()
