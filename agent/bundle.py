"""The edgerun bundle: one signed tar archive holding a model and its evidence.

Layout and rules are in docs/DESIGN.md. Reading is defensive: the signature is
checked before anything in the manifest is trusted, every member is checked
against the manifest while it is streamed, and nothing is written outside the
destination directory. Each rule has its own error class so callers (and people)
can tell exactly what was wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from agent import __version__ as AGENT_VERSION
from agent.signing import key_id, sign, verify
from agent.version import VersionFormatError, compare_versions, parse_version

log = logging.getLogger(__name__)

SCHEMA = "edgerun.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SUFFIX = ".edgebundle"
FORMATS = ("onnx", "tflite")
DTYPES = (
    "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64",
    "float16", "float32", "float64",
)  # fmt: skip
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class BundleError(Exception):
    """Base of every bundle refusal. `code` is stable and machine-readable."""

    code = "bundle.invalid"


class BundleFormatError(BundleError):
    """Not a tar archive, or a truncated/corrupt one."""

    code = "bundle.format"


class UnsafeMemberError(BundleError):
    """Absolute path, `..`, link, device, fifo or duplicate member."""

    code = "bundle.unsafe_member"


class OversizeError(BundleError):
    """Archive, member, manifest or declared size above the configured caps."""

    code = "bundle.oversize"


class MissingManifestError(BundleError):
    code = "bundle.no_manifest"


class SignatureError(BundleError):
    """Signature missing or not valid for the manifest bytes."""

    code = "bundle.bad_signature"


class UntrustedSignerError(BundleError):
    """Validly shaped signature, but by no key this device trusts."""

    code = "bundle.untrusted_signer"


class SchemaError(BundleError):
    """Unknown schema, or a manifest field of the wrong shape."""

    code = "bundle.schema"


class UnlistedFileError(BundleError):
    code = "bundle.unlisted_file"


class MissingFileError(BundleError):
    code = "bundle.missing_file"


class HashMismatchError(BundleError):
    code = "bundle.hash_mismatch"


class SizeMismatchError(BundleError):
    code = "bundle.size_mismatch"


class IncompatibleAgentError(BundleError):
    code = "bundle.agent_too_old"


class VersionNotNewerError(BundleError):
    code = "bundle.version_not_newer"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Limits:
    """Caps applied while reading; defaults suit models for small devices."""

    max_bundle_bytes: int = 1 << 30
    max_member_bytes: int = 768 << 20
    max_manifest_bytes: int = 1 << 20
    max_members: int = 64


LEGACY_BATCH_AXIS = -1  # TensorSpec's default: apply legacy_batch_axis() to its shape


def legacy_batch_axis(shape: tuple[int, ...]) -> int | None:
    """The rule for manifests written before `batch_axis`: 0 when the first dim is dynamic."""
    return 0 if shape and shape[0] == -1 else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 marks a dynamic dimension
    quantization: dict[str, Any] | None = None
    # The axis that counts cases (rows), or None for a tensor every case shares (a
    # 0-d sample rate, a lookup table). Left at LEGACY_BATCH_AXIS it follows the
    # legacy rule, so manifests and code that predate the field keep their meaning.
    batch_axis: int | None = LEGACY_BATCH_AXIS

    def __post_init__(self) -> None:
        if self.batch_axis == LEGACY_BATCH_AXIS:
            object.__setattr__(self, "batch_axis", legacy_batch_axis(self.shape))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "batch_axis": self.batch_axis,
        }
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out


@dataclass(frozen=True)
class Manifest:
    raw: dict[str, Any]
    name: str
    version: str
    files: dict[str, tuple[str, int]]
    formats: dict[str, str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    golden_inputs: str | None
    golden_outputs: dict[str, str]
    golden_atol: float
    golden_rtol: float
    peak_memory_mb: dict[str, float]
    min_agent_version: str
    key_id: str

    @property
    def batchable(self) -> bool:
        """True when every tensor counts cases on axis 0: requests may then be stacked."""
        return all(t.batch_axis == 0 for t in self.inputs + self.outputs)

    @property
    def figures(self) -> dict[str, Any]:
        figures = self.raw.get("figures", {})
        return figures if isinstance(figures, dict) else {}


@dataclass
class VerifiedBundle:
    path: Path
    sha256: str
    manifest: Manifest
    manifest_bytes: bytes
    signer: str
    directory: Path | None = None  # set when unpacked


# --------------------------------------------------------------------------- manifest


def _req(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise SchemaError(f"manifest: missing field {where}{key}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SchemaError(
            f"manifest: field {where}{key} is {type(value).__name__}, expected {names}"
        )
    return value


def _tensor_specs(items: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(items, list) or not items:
        raise SchemaError(f"manifest: {where} must be a non-empty list of tensors")
    specs = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        at = f"{where}[{i}]."
        if not isinstance(item, dict):
            raise SchemaError(f"manifest: {where}[{i}] must be an object")
        name = _req(item, "name", str, at)
        dtype = _req(item, "dtype", str, at)
        shape = _req(item, "shape", list, at)
        if dtype not in DTYPES:
            raise SchemaError(f"manifest: {at}dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape):
            raise SchemaError(f"manifest: {at}shape {shape!r} must be integers >= -1")
        if name in seen:
            raise SchemaError(f"manifest: {where} names {name!r} twice")
        seen.add(name)
        quant = item.get("quantization")
        if quant is not None and not isinstance(quant, dict):
            raise SchemaError(f"manifest: {at}quantization must be an object or null")
        axis = _batch_axis(item, tuple(shape), at)
        specs.append(TensorSpec(name, dtype, tuple(shape), quant, axis))
    return tuple(specs)


def _batch_axis(item: Mapping[str, Any], shape: tuple[int, ...], at: str) -> int | None:
    """`batch_axis`: absent = legacy rule; null = no batch axis; else a dynamic dim's index."""
    if "batch_axis" not in item:
        return legacy_batch_axis(shape)
    axis = item["batch_axis"]
    if axis is None:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise SchemaError(
            f"manifest: {at}batch_axis is {type(axis).__name__}, expected an integer or null"
        )
    if not shape:
        raise SchemaError(
            f"manifest: {at}batch_axis is {axis} but the tensor is 0-d (a scalar); "
            "use null: a scalar has no batch axis"
        )
    if not 0 <= axis < len(shape):
        raise SchemaError(
            f"manifest: {at}batch_axis {axis} is outside the shape {list(shape)} "
            f"(rank {len(shape)}: 0..{len(shape) - 1}, or null for no batch axis)"
        )
    if shape[axis] != -1:
        raise SchemaError(
            f"manifest: {at}batch_axis {axis} names a fixed dimension of size {shape[axis]} "
            f"in {list(shape)}; the batch axis must be dynamic (-1)"
        )
    return axis


def parse_manifest(data: bytes) -> Manifest:
    """Validate the manifest's shape; raises SchemaError naming the field."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError(f"manifest.json is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise SchemaError("manifest.json must hold a JSON object")
    schema = raw.get("schema")
    if schema != SCHEMA:
        raise SchemaError(
            f"manifest schema {schema!r} is not supported; this agent reads {SCHEMA!r}"
        )
    name = _req(raw, "name", str, "")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name):
        raise SchemaError(f"manifest: name {name!r} must be 1-64 of A-Za-z0-9._-")
    version = _req(raw, "version", str, "")
    min_agent = raw.get("min_agent_version", "0.0.0")
    try:
        parse_version(version)
        parse_version(min_agent)
    except VersionFormatError as exc:
        raise SchemaError(f"manifest: {exc}") from exc

    files_raw = _req(raw, "files", dict, "")
    files: dict[str, tuple[str, int]] = {}
    for path, entry in files_raw.items():
        _check_member_name(path)
        if path in (MANIFEST, SIGNATURE):
            raise SchemaError(f"manifest: files must not list {path}")
        if not isinstance(entry, dict):
            raise SchemaError(f"manifest: files[{path!r}] must be an object")
        digest = _req(entry, "sha256", str, f"files[{path!r}].")
        size = _req(entry, "size", int, f"files[{path!r}].")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise SchemaError(f"manifest: files[{path!r}].sha256 is not 64 lowercase hex digits")
        if size < 0:
            raise SchemaError(f"manifest: files[{path!r}].size is negative")
        files[path] = (digest, size)

    formats_raw = _req(raw, "formats", dict, "")
    if not formats_raw:
        raise SchemaError(f"manifest: formats is empty; expected one of {', '.join(FORMATS)}")
    formats: dict[str, str] = {}
    for fmt, path in formats_raw.items():
        if fmt not in FORMATS:
            raise SchemaError(f"manifest: format {fmt!r} is not one of {', '.join(FORMATS)}")
        if not isinstance(path, str) or path not in files:
            raise SchemaError(f"manifest: formats.{fmt} names {path!r}, which is not in files")
        formats[fmt] = path

    golden = raw.get("golden") or {}
    if not isinstance(golden, dict):
        raise SchemaError("manifest: golden must be an object")
    g_inputs = golden.get("inputs")
    g_outputs = golden.get("outputs") or {}
    if g_inputs is not None and g_inputs not in files:
        raise SchemaError(f"manifest: golden.inputs names {g_inputs!r}, which is not in files")
    if not isinstance(g_outputs, dict):
        raise SchemaError("manifest: golden.outputs must map a format to a file")
    for fmt, path in g_outputs.items():
        if fmt not in formats or path not in files:
            raise SchemaError(
                f"manifest: golden.outputs.{fmt} must name a listed file of a bundled format"
            )
    tolerance = golden.get("tolerance") or {}
    try:
        atol = float(tolerance.get("atol", 1e-4))
        rtol = float(tolerance.get("rtol", 1e-3))
    except (TypeError, ValueError, AttributeError) as exc:
        raise SchemaError("manifest: golden.tolerance.atol/rtol must be numbers") from exc

    figures = raw.get("figures") or {}
    peak = figures.get("peak_memory_mb", {}) if isinstance(figures, dict) else {}
    if not isinstance(peak, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in peak.values()
    ):
        raise SchemaError("manifest: figures.peak_memory_mb must map runtime names to numbers")

    labels = raw.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise SchemaError("manifest: labels must be a list of strings")

    return Manifest(
        raw=raw,
        name=name,
        version=version,
        files=files,
        formats=formats,
        inputs=_tensor_specs(raw.get("inputs"), "inputs"),
        outputs=_tensor_specs(raw.get("outputs"), "outputs"),
        labels=tuple(labels),
        golden_inputs=g_inputs,
        golden_outputs=dict(g_outputs),
        golden_atol=atol,
        golden_rtol=rtol,
        peak_memory_mb={k: float(v) for k, v in peak.items()},
        min_agent_version=min_agent,
        key_id=str(raw.get("key_id", "")),
    )


# --------------------------------------------------------------------------- reading


def _check_member_name(name: str) -> None:
    if not name or "\x00" in name or "\\" in name:
        raise UnsafeMemberError(f"archive member name {name!r} is empty or has NUL/backslash")
    if name.startswith("/") or posixpath.isabs(name):
        raise UnsafeMemberError(f"archive member {name!r} has an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeMemberError(f"archive member {name!r} climbs out with '..'")
    if posixpath.normpath(name) != name.rstrip("/") or "." in parts:
        raise UnsafeMemberError(f"archive member {name!r} is not a normalized relative path")


def _check_member(member: tarfile.TarInfo, limits: Limits) -> None:
    _check_member_name(member.name)
    if member.issym() or member.islnk():
        raise UnsafeMemberError(
            f"archive member {member.name!r} is a link to {member.linkname!r}; links are refused"
        )
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeMemberError(f"archive member {member.name!r} is a device or fifo")
    if not (member.isfile() or member.isdir()):
        raise UnsafeMemberError(f"archive member {member.name!r} is not a regular file")
    if member.size > limits.max_member_bytes:
        raise OversizeError(
            f"archive member {member.name!r} is {member.size} bytes; "
            f"the cap is {limits.max_member_bytes}"
        )


def _read_all(stream: IO[bytes], size: int, name: str) -> bytes:
    try:
        data = stream.read(size + 1)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"archive is truncated or corrupt in {name!r}: {exc}") from exc
    if len(data) != size:
        raise BundleFormatError(f"archive is truncated in {name!r}")
    return data


class _Reader:
    """One pass over the archive, checking each member as it streams by."""

    def __init__(self, path: Path, keys: Iterable[Ed25519PublicKey], limits: Limits) -> None:
        self.path = path
        self.keys = list(keys)
        self.limits = limits

    def digest(self) -> str:
        """sha256 of the whole file, after the size cap (the bundle's identity)."""
        try:
            size = self.path.stat().st_size
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {self.path}: {exc.strerror}") from exc
        if size > self.limits.max_bundle_bytes:
            raise OversizeError(
                f"bundle is {size} bytes; the cap is {self.limits.max_bundle_bytes}"
            )
        try:
            return _sha256_file(self.path)
        except OSError as exc:
            raise BundleFormatError(f"cannot read bundle {self.path}: {exc.strerror}") from exc

    def run(self, dest: Path | None, sha256: str | None = None) -> VerifiedBundle:
        """Check every rule; `sha256` is the file's digest when the caller has it."""
        sha = self.digest() if sha256 is None else sha256
        try:
            # Plain tar only: no decompression bombs.
            tar = tarfile.open(self.path, mode="r:")  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BundleFormatError(f"{self.path.name} is not a tar archive: {exc}") from exc
        with tar:
            return self._walk(tar, sha, dest)

    def _members(self, tar: tarfile.TarFile) -> Iterable[tarfile.TarInfo]:
        count = 0
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BundleFormatError(f"archive is truncated or corrupt: {exc}") from exc
            if member is None:
                return
            count += 1
            if count > self.limits.max_members:
                raise OversizeError(f"archive has more than {self.limits.max_members} members")
            yield member

    def _walk(self, tar: tarfile.TarFile, sha: str, dest: Path | None) -> VerifiedBundle:
        manifest_bytes: bytes | None = None
        sig: bytes | None = None
        manifest: Manifest | None = None
        signer = ""
        seen: set[str] = set()
        for member in self._members(tar):
            _check_member(member, self.limits)
            name = member.name.rstrip("/")
            if name in seen:
                raise UnsafeMemberError(f"archive member {name!r} appears twice")
            seen.add(name)
            if member.isdir():
                continue
            stream = tar.extractfile(member)
            if stream is None:  # pragma: no cover - isfile() guarantees a stream
                raise UnsafeMemberError(f"archive member {name!r} has no data")
            if name in (MANIFEST, SIGNATURE):
                if manifest is not None:
                    raise SchemaError(f"{name} must come before the files it lists")
                if member.size > self.limits.max_manifest_bytes:
                    raise OversizeError(
                        f"{name} is {member.size} bytes; the cap is "
                        f"{self.limits.max_manifest_bytes}"
                    )
                data = _read_all(stream, member.size, name)
                if name == MANIFEST:
                    manifest_bytes = data
                else:
                    sig = data
                if manifest_bytes is not None and sig is not None:
                    signer = self._check_signature(manifest_bytes, sig)
                    manifest = parse_manifest(manifest_bytes)
                continue
            if manifest is None:
                raise MissingManifestError(
                    f"archive member {name!r} comes before a signed manifest.json and "
                    "manifest.sig; a bundle starts with both"
                )
            self._check_file(manifest, name, member, stream, dest)
        if manifest_bytes is None:
            raise MissingManifestError("bundle has no manifest.json")
        if sig is None:
            raise SignatureError("bundle has no manifest.sig; unsigned bundles are refused")
        assert manifest is not None
        missing = sorted(set(manifest.files) - seen)
        if missing:
            raise MissingFileError(f"bundle lacks files its manifest lists: {', '.join(missing)}")
        if compare_versions(AGENT_VERSION, manifest.min_agent_version) < 0:
            raise IncompatibleAgentError(
                f"bundle needs agent {manifest.min_agent_version} or newer; this is {AGENT_VERSION}"
            )
        return VerifiedBundle(self.path, sha, manifest, manifest_bytes, signer, dest)

    def _check_signature(self, manifest_bytes: bytes, sig: bytes) -> str:
        if len(sig) != 64:
            raise SignatureError(f"manifest.sig is {len(sig)} bytes; an ed25519 signature is 64")
        if not self.keys:
            raise UntrustedSignerError("no trusted public keys are configured")
        for key in self.keys:
            if verify(key, sig, manifest_bytes):
                return key_id(key)
        # Tell apart "signed by someone else" from "tampered": the manifest names its signer.
        try:
            claimed = json.loads(manifest_bytes).get("key_id", "?")
        except (ValueError, AttributeError):
            claimed = "?"
        trusted = ", ".join(key_id(k) for k in self.keys)
        if claimed in {key_id(k) for k in self.keys}:
            raise SignatureError(
                f"manifest signature does not verify with trusted key {claimed}: the manifest "
                "or its signature was altered"
            )
        raise UntrustedSignerError(
            f"manifest is not signed by a trusted key (it names key {claimed}; trusted: {trusted})"
        )

    def _check_file(
        self,
        manifest: Manifest,
        name: str,
        member: tarfile.TarInfo,
        stream: IO[bytes],
        dest: Path | None,
    ) -> None:
        if name not in manifest.files:
            raise UnlistedFileError(f"archive member {name!r} is not listed in the manifest")
        digest, size = manifest.files[name]
        if size > self.limits.max_member_bytes:
            raise OversizeError(
                f"manifest declares {name!r} as {size} bytes; the cap is "
                f"{self.limits.max_member_bytes}"
            )
        if member.size != size:
            raise SizeMismatchError(
                f"{name!r} is {member.size} bytes in the archive; the manifest says {size}"
            )
        out: IO[bytes] | None = None
        if dest is not None:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            out = target.open("xb")
        h = hashlib.sha256()
        got = 0
        try:
            while True:
                try:
                    chunk = stream.read(min(_CHUNK, size - got + 1))
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise BundleFormatError(
                        f"archive is truncated or corrupt in {name!r}: {exc}"
                    ) from exc
                if not chunk:
                    break
                got += len(chunk)
                h.update(chunk)
                if out is not None:
                    out.write(chunk)
        finally:
            if out is not None:
                out.close()
        if got != size:
            raise BundleFormatError(f"archive is truncated in {name!r} ({got} of {size} bytes)")
        if h.hexdigest() != digest:
            raise HashMismatchError(
                f"{name!r} has sha256 {h.hexdigest()}; the manifest says {digest}"
            )


def bundle_digest(path: Path, limits: Limits | None = None) -> str:
    """sha256 of a bundle file (its identity on a device), refusing files over the cap."""
    return _Reader(Path(path), [], limits or Limits()).digest()


def verify_bundle(
    path: Path,
    keys: Iterable[Ed25519PublicKey],
    limits: Limits | None = None,
    sha256: str | None = None,
) -> VerifiedBundle:
    """Check every rule without writing anything; raise a BundleError subclass if one fails.

    Pass `sha256` (from bundle_digest) to skip hashing the file a second time.
    """
    return _Reader(Path(path), keys, limits or Limits()).run(dest=None, sha256=sha256)


def unpack_bundle(
    path: Path,
    dest: Path,
    keys: Iterable[Ed25519PublicKey],
    limits: Limits | None = None,
    sha256: str | None = None,
) -> VerifiedBundle:
    """Verify and unpack into `dest` (must not exist). On any failure nothing is left behind.

    Files are unpacked into a sibling temporary directory, made read-only, then
    renamed into place, so `dest` either holds a complete verified bundle or nothing.
    """
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        bundle = _Reader(Path(path), keys, limits or Limits()).run(dest=tmp, sha256=sha256)
        (tmp / MANIFEST).write_bytes(bundle.manifest_bytes)
        _make_read_only(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        _remove_tree(tmp)
        raise
    bundle.directory = dest
    return bundle


def load_unpacked(directory: Path) -> Manifest:
    """Read the manifest of a bundle this agent unpacked earlier (already verified)."""
    return parse_manifest((Path(directory) / MANIFEST).read_bytes())


def _make_read_only(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o444)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o555)
    os.chmod(root, 0o555)


def _remove_tree(root: Path) -> None:
    if not root.exists():
        return
    for dirpath, dirnames, _ in os.walk(root):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
    shutil.rmtree(root, ignore_errors=True)


def remove_unpacked(root: Path) -> None:
    _remove_tree(Path(root))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for f in filenames:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- writing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.type = tarfile.REGTYPE
    return info


def write_bundle(
    out_path: Path,
    manifest: Mapping[str, Any],
    files: Mapping[str, Path],
    private_key: Ed25519PrivateKey,
) -> Path:
    """Write and sign a bundle. `manifest` holds everything but schema/files/key_id.

    The archive is written to a temporary file in the same directory and renamed
    into place, so a failed build never leaves half a bundle behind.
    """
    out_path = Path(out_path)
    listed: dict[str, dict[str, Any]] = {}
    for arcname, src in sorted(files.items()):
        _check_member_name(arcname)
        if arcname in (MANIFEST, SIGNATURE):
            raise ValueError(f"{arcname} is written by write_bundle itself")
        listed[arcname] = {"sha256": _sha256_file(Path(src)), "size": Path(src).stat().st_size}
    body = dict(manifest)
    body.setdefault("created", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    body.setdefault("min_agent_version", AGENT_VERSION)
    body["schema"] = SCHEMA
    body["files"] = listed
    body["key_id"] = key_id(private_key.public_key())
    manifest_bytes = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    parse_manifest(manifest_bytes)  # never write a bundle a device would refuse as malformed
    signature = sign(private_key, manifest_bytes)
    mtime = int(datetime.now(UTC).timestamp())

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".bundle-", dir=out_path.parent)
    try:
        with (
            os.fdopen(fd, "wb") as fh,
            tarfile.open(fileobj=fh, mode="w:", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(_tarinfo(MANIFEST, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes))
            tar.addfile(_tarinfo(SIGNATURE, len(signature), mtime), io.BytesIO(signature))
            for arcname, src in sorted(files.items()):
                size = listed[arcname]["size"]
                with Path(src).open("rb") as data:
                    tar.addfile(_tarinfo(arcname, size, mtime), data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log.info("wrote bundle %s (%d files, signed by %s)", out_path, len(files), body["key_id"])
    return out_path
