"""Hostile bundles (issue 7, sections 1 and 2), generated at run time.

Every case is built here from the sample bundle's parts: raw ustar blocks
written byte by byte (not by tarfile, which would refuse to write most of
them), manifests signed with the demo key (a leaked key or a buggy builder:
validly signed, still malicious), and golden .npz files assembled entry by entry.
Each is judged by the real reader (`verify_bundle`); golden cases whose harm is
in the array values go on to a real onnxruntime session and `check_golden`, and
version cases to the same version rule admission applies. A representative few
per class are then given to a real agent process that already serves the
sample 1.0.0: it must keep serving it and exit 0 on SIGTERM.

    python -m tests.hostile.bundles          # prints one line per case
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import bundle as B
from agent.bundle_errors import BundleError, VersionNotNewerError
from agent.config.model import AgentConfig
from agent.golden import check_golden
from agent.runtimes import load_runtime
from agent.signing import load_private_key, load_public_key, sign
from agent.version import compare_versions
from tests.helpers import (
    DEMO_KEY,
    DEMO_PUB,
    ROOT,
    SampleParts,
    base_config,
    running_agent,
    samples,
    unpack_sample,
)
from tests.hostile import Case, Outcome

CLASSES = (
    "bundle.tar",  # header-level attacks on the archive
    "bundle.end",  # where and how the archive ends
    "bundle.json",  # the manifest's bytes as JSON
    "bundle.manifest",  # validly signed, malformed or malicious fields
    "bundle.golden",  # golden files that disable the check or attack numpy
    "bundle.version",  # version and name rules
    "bundle.agent",  # a representative few, given to a real agent serving 1.0.0
    "bundle.cli",  # the same few, given to `edge-agent verify` as a real process
)
RUNNING_VERSION = "1.0.0"
NEXT_VERSION = "1.0.1"
MB = 1024 * 1024

F, U, OVER, S = "bundle.format", "bundle.unsafe_member", "bundle.oversize", "bundle.schema"
SIG, UNTRUSTED = "bundle.bad_signature", "bundle.untrusted_signer"
NOMAN, GI, GM = "bundle.no_manifest", "bundle.golden_invalid", "bundle.golden_mismatch"
NOT_NEWER = "bundle.version_not_newer"

# --------------------------------------------------------------------------- raw ustar


def block(
    name: bytes,
    size: int = 0,
    *,
    typeflag: bytes = b"0",
    magic: bytes = b"ustar\x0000",
    size_field: bytes | None = None,
    checksum: bytes | None = None,
    prefix: bytes = b"",
    linkname: bytes = b"",
) -> bytes:
    """One 512-byte tar header with every field under the caller's control."""
    b = bytearray(512)
    b[0 : min(len(name), 100)] = name[:100]
    b[100:108] = b"0000644\x00"
    b[108:116] = b"0000000\x00"
    b[116:124] = b"0000000\x00"
    b[124:136] = size_field if size_field is not None else b"%011o\x00" % size
    b[136:148] = b"%011o\x00" % 1_700_000_000
    b[148:156] = b" " * 8
    b[156:157] = typeflag
    b[157 : 157 + len(linkname)] = linkname[:100]
    b[257:265] = magic
    b[345 : 345 + len(prefix)] = prefix[:155]
    b[148:156] = checksum if checksum is not None else b"%06o\x00 " % sum(b)
    return bytes(b)


def pad(n: int) -> bytes:
    return bytes(-n % 512)


def member(name: str | bytes, data: bytes, **kw: Any) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return block(raw, len(data), **kw) + data + pad(len(data))


END = bytes(1024)

# --------------------------------------------------------------------------- material


@dataclass
class Material:
    """The sample's parts, and builders of (possibly hostile) bundles from them."""

    parts: SampleParts
    key: Ed25519PrivateKey
    out: Path
    files: dict[str, bytes] = field(default_factory=dict)
    _n: int = 0

    def __post_init__(self) -> None:
        self.files = {n: p.read_bytes() for n, p in sorted(self.parts.files().items())}

    def manifest(self, contents: dict[str, bytes] | None = None, **changes: Any) -> dict[str, Any]:
        body = dict(self.parts.manifest)
        body["files"] = {
            n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
            for n, d in sorted((contents or self.files).items())
        }
        # Newer than the running sample, so a refusal can only come from the hostile part.
        body["version"] = NEXT_VERSION
        body.update(changes)
        return {k: v for k, v in body.items() if v is not DROP}

    def signed(self, manifest_bytes: bytes, key: Ed25519PrivateKey | None = None) -> bytes:
        sig = sign(key or self.key, manifest_bytes)
        return member("manifest.json", manifest_bytes) + member("manifest.sig", sig)

    def write(self, data: bytes) -> Path:
        self._n += 1
        path = self.out / f"case-{self._n:03d}.edgebundle"
        path.write_bytes(data)
        return path

    def bundle(
        self,
        contents: dict[str, bytes] | None = None,
        raw_manifest: bytes | None = None,
        end: bytes = END,
        **changes: Any,
    ) -> Path:
        """A bundle whose manifest lists `contents` by their real hashes, signed, then `changes`."""
        contents = self.files if contents is None else contents
        data = raw_manifest or dumps(self.manifest(contents, **changes))
        body = b"".join(member(n, d) for n, d in sorted(contents.items()))
        return self.write(self.signed(data) + body + end)

    def body(self, files: dict[str, bytes] | None = None) -> bytes:
        return b"".join(member(n, d) for n, d in sorted((files or self.files).items()))


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()  # a manifest change that removes the field


def sub(text: str, old: str, new: str) -> bytes:
    """`text` with `old` replaced; a case whose edit misses would test nothing."""
    assert old in text, f"{old!r} is not in the manifest"
    return text.replace(old, new).encode()


def _atol_text(manifest: dict[str, Any]) -> str:
    """The golden tolerance's top-level atol as json.dumps writes it, to edit in place."""
    return f'"atol": {json.dumps(manifest["golden"]["tolerance"]["atol"])}'


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------- npz


def npy(
    descr: str, shape: str, data: bytes = b"", version: int = 1, header: str | None = None
) -> bytes:
    text = header or f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    raw = text.encode("latin-1")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data
    return bytes([0x93]) + b"NUMPY" + bytes([version, 0]) + struct.pack("<I", len(raw)) + raw + data


def npy_of(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def zip_of(
    entries: list[tuple[str, bytes]],
    *,
    method: int = 0,
    flags: int = 0,
    comment: bytes = b"",
    sizes: tuple[int, int] | None = None,
) -> bytes:
    """A zip archive written entry by entry, so each field can be made hostile."""
    out = bytearray()
    central = bytearray()
    for name, data in entries:
        raw = name.encode()
        payload = data
        if method == 8:
            c = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = c.compress(data) + c.flush()
        csize, usize = sizes or (len(payload), len(data))
        crc = zlib.crc32(data)
        offset = len(out)
        out += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0, crc, csize, usize, len(raw), 0
        )
        out += raw + payload
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, method, 0, 0, crc, csize,
            usize, len(raw), 0, 0, 0, 0, 0, offset,
        )  # fmt: skip
        central += raw
    cd_offset = len(out)
    out += central
    out += struct.pack(
        "<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset,
        len(comment),
    )  # fmt: skip
    return bytes(out + comment)


def npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


# --------------------------------------------------------------------------- judges


Judge = Callable[[Path], None]
LIMITS = B.Limits()


def verify(path: Path, limits: B.Limits = LIMITS) -> B.VerifiedBundle:
    return B.verify_bundle(path, [load_public_key(DEMO_PUB)], limits)


def verify_only(limits: B.Limits = LIMITS) -> Judge:
    def judge(path: Path) -> None:
        verify(path, limits)

    return judge


def install_version(path: Path) -> None:
    """The version rule admission applies against the running sample."""
    verified = verify(path)
    new = verified.manifest.version
    if compare_versions(new, RUNNING_VERSION) <= 0:
        raise VersionNotNewerError(
            f"bundle version {new} is not newer than the running {RUNNING_VERSION}"
        )


def replay_golden(path: Path) -> None:
    """Verify, unpack and replay the goldens on a real onnxruntime session."""
    dest = path.with_suffix(".unpacked")
    verified = B.unpack_bundle(path, dest, [load_public_key(DEMO_PUB)])
    try:
        runtime = load_runtime("onnxruntime", verified.manifest, dest, AgentConfig().runtimes)
        try:
            check_golden(verified.manifest, dest, runtime)
        finally:
            runtime.close()
    finally:
        B.remove_unpacked(dest)


# --------------------------------------------------------------------------- cases


@dataclass
class Spec:
    case: Case
    build: Callable[[], Path]
    judge: Judge = field(default_factory=verify_only)
    agent: bool = False  # also give it to a real agent process


def _tar_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.tar"
    man = dumps(m.manifest())
    head = m.signed(man)
    onnx = m.files["model.onnx"]
    rest = {n: d for n, d in m.files.items() if n != "model.onnx"}

    def with_member(raw: bytes, before: bool = False) -> Callable[[], Path]:
        return lambda: m.write((raw + head if before else head + raw) + m.body() + END)

    def replace_onnx(raw: bytes) -> Callable[[], Path]:
        return lambda: m.write(head + m.body(rest) + raw + END)

    yield Spec(
        Case(k, "negative-base256-size", (F,), "ValueError in tarfile's _read_all"),
        replace_onnx(block(b"model.onnx", size_field=b"\xff" * 12) + onnx + pad(len(onnx))),
        agent=True,
    )
    yield Spec(
        Case(k, "positive-base256-size", (F,)),
        replace_onnx(
            block(b"model.onnx", size_field=b"\x80" + len(onnx).to_bytes(11, "big"))
            + onnx
            + pad(len(onnx))
        ),
    )
    yield Spec(
        Case(k, "base256-manifest-size", (F,)),
        lambda: m.write(block(b"manifest.json", size_field=b"\x80" + bytes(10) + b"\x10") + END),
    )
    pax = b"".join(b"%d path=%s\n" % (len(b"path=") + 2 + 6 + 90, b"a" * 90) for _ in range(1600))
    yield Spec(
        Case(k, "pax-header-160KB", (F,), "CVE-2024-6232: quadratic pax parsing, 60 s"),
        with_member(member("././@PaxHeader", pax, typeflag=b"x"), before=True),
    )
    yield Spec(
        Case(k, "pax-header-after-signature", (F,)),
        with_member(member("././@PaxHeader", b"20 path=model.onnx\n", typeflag=b"x")),
    )
    yield Spec(
        Case(k, "pax-global-header", (F,)),
        with_member(member("pax_global_header", b"20 comment=hello\n", typeflag=b"g"), True),
    )
    yield Spec(
        Case(k, "gnu-long-name-16MB", (F,), "100 MB took 663 MB in verify, 1.9 GB in the agent"),
        lambda: m.write(head + member("././@LongLink", b"a" * (16 * MB), typeflag=b"L") + END),
        agent=True,
    )
    yield Spec(
        Case(k, "gnu-long-link", (F,)),
        with_member(member("././@LongLink", b"model.onnx\x00", typeflag=b"K")),
    )
    yield Spec(
        Case(k, "listed-file-is-a-directory", (U,), "passed verify, installed without the file"),
        replace_onnx(block(b"model.onnx/", typeflag=b"5")),
        agent=True,
    )
    yield Spec(
        Case(k, "listed-file-is-a-directory-no-slash", (U,)),
        replace_onnx(block(b"model.onnx", typeflag=b"5")),
    )
    yield Spec(
        Case(k, "directory-entry-for-golden", (U,)),
        lambda: m.write(head + block(b"golden/", typeflag=b"5") + m.body() + END),
    )
    for flag, what in [(b"1", "hard-link"), (b"2", "symlink")]:
        yield Spec(
            Case(k, f"{what}-instead-of-model", (U,)),
            replace_onnx(block(b"model.onnx", typeflag=flag, linkname=b"/etc/shadow")),
        )
    for flag, what in [(b"3", "char-device"), (b"4", "block-device"), (b"6", "fifo")]:
        yield Spec(Case(k, what, (U,)), replace_onnx(block(b"model.onnx", typeflag=flag)))
    yield Spec(
        Case(k, "contiguous-file-type", (F,)),
        replace_onnx(member("model.onnx", onnx, typeflag=b"7")),
    )
    yield Spec(
        Case(k, "unknown-typeflag", (F,)), replace_onnx(member("model.onnx", onnx, typeflag=b"Z"))
    )
    yield Spec(
        Case(k, "gnu-magic", (F,)),
        lambda: m.write(member("manifest.json", man, magic=b"ustar  \x00") + END),
    )
    yield Spec(
        Case(k, "v7-header-no-magic", (F,)),
        lambda: m.write(member("manifest.json", man, magic=bytes(8)) + END),
    )
    yield Spec(
        Case(k, "bad-checksum-first-header", (F,)),
        lambda: m.write(member("manifest.json", man, checksum=b"0000000\x00") + END),
    )
    yield Spec(
        Case(k, "bad-checksum-later-header", (F,)),
        replace_onnx(member("model.onnx", onnx, checksum=b"0000001\x00")),
    )
    yield Spec(
        Case(k, "non-octal-size", (F,)),
        replace_onnx(block(b"model.onnx", size_field=b"0000000009a\x00") + onnx),
    )
    yield Spec(
        Case(k, "size-with-leading-spaces", (F,)),
        replace_onnx(
            block(b"model.onnx", size_field=b"   %08o\x00" % len(onnx)) + onnx + pad(len(onnx))
        ),
    )
    yield Spec(
        Case(k, "size-beyond-end-of-file", (F,)),
        replace_onnx(block(b"model.onnx", 700 * MB) + onnx),
    )
    yield Spec(
        Case(k, "size-over-member-cap", (OVER,)),
        replace_onnx(block(b"model.onnx", size_field=b"%011o\x00" % (8 * 1024**3)) + onnx),
    )
    yield Spec(
        Case(k, "more-members-than-cap", (OVER,)),
        lambda: m.bundle(),
        verify_only(B.Limits(max_members=4)),
    )
    yield Spec(Case(k, "non-ascii-name", (U,)), replace_onnx(member("modèl.onnx".encode(), onnx)))
    yield Spec(
        Case(k, "bytes-after-name-nul", (F,)), replace_onnx(member(b"model.onnx\x00evil", onnx))
    )
    for name, note in [
        ("../escape.txt", "climbs out"),
        ("/etc/cron.d/x", "absolute"),
        ("golden/./inputs.npz", "not normalized"),
        ("golden//inputs.npz", "empty component"),
        ("..\\escape.txt", "backslash"),
        ("model onnx", "space"),
        ("model.onnx\n", "newline"),
    ]:
        yield Spec(
            Case(k, f"member-name-{note.replace(' ', '-')}", (U,)), with_member(member(name, b"x"))
        )
    yield Spec(
        Case(k, "prefix-climbs-out", (U,)),
        with_member(member("passwd", b"x", prefix=b"../../etc")),
    )
    yield Spec(
        Case(k, "component-over-100-bytes-via-prefix", (U,)),
        with_member(member("x", b"x", prefix=b"a" * 150)),
    )
    yield Spec(
        Case(k, "path-over-200-bytes-via-prefix", (U,)),
        with_member(member("b" * 90, b"x", prefix=b"a/" * 70 + b"a")),
    )
    yield Spec(
        Case(k, "link-name-on-regular-file", (F,)),
        replace_onnx(member("model.onnx", onnx, linkname=b"x")),
    )
    yield Spec(
        Case(k, "manifest-over-cap", (OVER,)),
        lambda: m.write(member("manifest.json", b" " * (LIMITS.max_manifest_bytes + 1)) + END),
    )
    yield Spec(
        Case(k, "signature-65-bytes", (SIG,)),
        lambda: m.write(member("manifest.json", man) + member("manifest.sig", bytes(65)) + END),
    )
    yield Spec(
        Case(k, "signature-claims-100MB", (SIG, F)),
        lambda: m.write(member("manifest.json", man) + block(b"manifest.sig", 100 * MB) + END),
    )
    yield Spec(
        Case(k, "empty-signature", (SIG,)),
        lambda: m.write(
            member("manifest.json", man) + member("manifest.sig", b"") + m.body() + END
        ),
    )
    yield Spec(
        Case(k, "manifest-twice", (U,)),
        lambda: m.write(member("manifest.json", man) + head + m.body() + END),
    )
    yield Spec(Case(k, "file-before-manifest", (NOMAN,)), lambda: m.write(m.body() + head + END))
    yield Spec(Case(k, "empty-file", (F,)), lambda: m.write(b""))
    yield Spec(Case(k, "511-bytes", (F,)), lambda: m.write(bytes(511)))
    yield Spec(Case(k, "only-end-blocks", (NOMAN,)), lambda: m.write(END))
    yield Spec(Case(k, "a-fifo-not-a-file", (F,), "reading it would block"), lambda: fifo(m))
    yield Spec(Case(k, "a-directory-not-a-file", (F,)), lambda: directory(m))
    yield Spec(
        Case(k, "gzip-compressed", (F,)), lambda: m.write(gzip.compress(head + m.body() + END))
    )
    yield Spec(Case(k, "zip-file", (F,)), lambda: m.write(zip_of([("manifest.json", man)])))
    assert len(man) % 512, "the manifest must leave padding to corrupt"
    yield Spec(
        Case(k, "nonzero-padding-after-data", (F,)),
        lambda: m.write(
            member("manifest.json", man)[:-1]
            + b"\x01"
            + head[len(member("manifest.json", man)) :]
            + m.body()
            + END
        ),
    )


def fifo(m: Material) -> Path:
    path = m.write(b"")
    path.unlink()
    os.mkfifo(path)
    return path


def directory(m: Material) -> Path:
    path = m.write(b"")
    path.unlink()
    path.mkdir()
    return path


def _end_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.end"
    whole = m.signed(dumps(m.manifest())) + m.body()
    junk = bytes(range(256)) * 2
    extra = member("evil.sh", b"#!/bin/sh\nrm -rf /\n")
    yield Spec(Case(k, "no-end-blocks", (F,)), lambda: m.write(whole))
    yield Spec(Case(k, "one-end-block", (F,)), lambda: m.write(whole + bytes(512)))
    yield Spec(Case(k, "trailing-garbage", (F,)), lambda: m.write(whole + END + b"garbage"))
    yield Spec(
        Case(k, "garbage-after-10KB-of-zeros", (F,)),
        lambda: m.write(whole + END + bytes(10240) + b"\x01"),
    )
    yield Spec(
        Case(k, "junk-block-in-the-middle", (F,), "silently ended the archive, hiding a member"),
        lambda: m.write(whole + junk + extra + END),
        agent=True,
    )
    yield Spec(
        Case(k, "member-hidden-after-one-zero-block", (F,)),
        lambda: m.write(whole + bytes(512) + extra + END),
    )
    yield Spec(
        Case(k, "second-archive-appended", (F,)),
        lambda: m.write(whole + END + extra + END),
    )
    yield Spec(Case(k, "cut-inside-a-header", (F,)), lambda: m.write(whole + extra[:300]))
    yield Spec(Case(k, "cut-inside-data", (F,)), lambda: m.write(whole[: len(whole) - 700]))
    yield Spec(
        Case(k, "cut-inside-padding", (F,)),
        lambda: m.write(whole[: len(whole) - len(pad(len(m.files["model.tflite"]))) // 2]),
    )
    yield Spec(Case(k, "end-then-partial-block", (F,)), lambda: m.write(whole + END[:700]))


def _json_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.json"
    good = m.manifest()
    other = Ed25519PrivateKey.generate()

    def raw(data: bytes, key: Ed25519PrivateKey | None = None) -> Callable[[], Path]:
        return lambda: m.write(m.signed(data, key) + m.body() + END)

    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    text = json.dumps(good, sort_keys=True)
    atol = _atol_text(good)
    inputs_size = f'"size": {good["files"]["golden/inputs.npz"]["size"]}'
    yield Spec(
        Case(k, "nested-100000-deep-signed", (S,), "RecursionError in verify and at start"),
        raw(deep),
        agent=True,
    )
    yield Spec(Case(k, "nested-100000-deep-other-key", (UNTRUSTED,)), raw(deep, other))
    yield Spec(
        Case(k, "nested-100000-deep-in-list", (S,)),
        raw(b"[" * 100_000 + b"]" * 100_000),
    )
    yield Spec(
        Case(k, "deep-in-a-field", (S,)),
        raw(dumps({**good, "figures": json.loads("[" * 40 + "]" * 40)})),
    )
    yield Spec(
        Case(k, "unterminated-escapes-400KB", (S,), "quadratic for a naive string scanner"),
        raw(b'"\\' * 200_000),
    )
    yield Spec(
        Case(k, "duplicate-key", (S,), "two readers could disagree on the version"),
        raw(sub(text, f'"version": "{NEXT_VERSION}"', '"version": "1.0.1", "version": "9.9.9"')),
    )
    for literal in ("NaN", "Infinity", "-Infinity"):
        yield Spec(
            Case(k, f"literal-{literal}", (S,)),
            raw(sub(text, atol, f'"atol": {literal}')),
        )
    yield Spec(Case(k, "float-1e999", (S,)), raw(sub(text, atol, '"atol": 1e999')))
    yield Spec(
        Case(k, "integer-5000-digits", (S,)),
        raw(sub(text, inputs_size, '"size": ' + "9" * 5000)),
    )
    yield Spec(
        Case(k, "invalid-utf8", (S,)), raw(dumps(good).replace(b'"digits"', b'"dig\xffits"'))
    )
    yield Spec(Case(k, "utf16", (S,)), raw(text.encode("utf-16")))
    yield Spec(Case(k, "utf8-bom", (S,)), raw(b"\xef\xbb\xbf" + dumps(good)))
    yield Spec(
        Case(k, "lone-surrogate", (S,)),
        raw(dumps({**good, "labels": ["0"] * 9}).replace(b'"labels": [', b'"labels": ["\\ud800",')),
    )
    yield Spec(Case(k, "top-level-list", (S,)), raw(b"[" + dumps(good) + b"]"))
    yield Spec(Case(k, "top-level-null", (S,)), raw(b"null"))
    yield Spec(Case(k, "trailing-garbage", (S,)), raw(dumps(good) + b"}"))
    yield Spec(Case(k, "empty-manifest", (S,)), raw(b""))
    yield Spec(
        Case(k, "labels-150000", (S,)),
        raw(json.dumps({**good, "labels": ["0"] * 150_000}, separators=(",", ":")).encode()),
    )
    yield Spec(
        Case(k, "huge-key-id-other-key", (UNTRUSTED,)),
        raw(dumps({**good, "key_id": "k" * 500_000}), other),
    )
    yield Spec(
        Case(k, "altered-after-signing", (SIG,)),
        lambda: m.write(
            member("manifest.json", dumps({**good, "version": "9.0.0"}))
            + member("manifest.sig", sign(m.key, dumps(good)))
            + m.body()
            + END
        ),
    )


def _manifest_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.manifest"
    good = m.manifest()
    golden = good["golden"]
    inputs, outputs = good["inputs"], good["outputs"]

    def changed(code: str, case: str, agent: bool = False, note: str = "", **changes: Any) -> Spec:
        return Spec(Case(k, case, (code,), note), lambda: m.bundle(**changes), agent=agent)

    yield changed(
        S,
        "golden-inputs-list",
        False,
        "TypeError",
        golden={**golden, "inputs": ["golden/inputs.npz"]},
    )
    yield changed(S, "golden-inputs-dict", note="TypeError", golden={**golden, "inputs": {"a": 1}})
    yield changed(
        S, "golden-outputs-list", golden={**golden, "outputs": ["golden/outputs-onnx.npz"]}
    )
    yield changed(S, "golden-output-path-dict", golden={**golden, "outputs": {"onnx": {}}})
    yield changed(S, "golden-string", golden="golden/inputs.npz")
    yield changed(S, "golden-list", golden=[])
    yield changed(S, "golden-tolerance-list", golden={**golden, "tolerance": [0.1]})
    yield changed(
        S, "golden-outputs-unknown-format", golden={**golden, "outputs": {"exe": "model.onnx"}}
    )
    yield changed(S, "golden-inputs-not-npz", golden={**golden, "inputs": "model.onnx"})
    yield changed(S, "golden-outputs-without-inputs", golden={**golden, "inputs": None})
    yield changed(S, "golden-inputs-without-outputs", golden={**golden, "outputs": {}})

    # `variants` (docs/DESIGN.md "Variants"): each field refused with bundle.schema.
    one = {"id": "onnx-a", "format": "onnx", "file": "model.onnx",
           "golden": {"outputs": "golden/outputs-onnx.npz"}}  # fmt: skip
    yield changed(S, "variants-object", variants={"onnx-a": one})
    yield changed(S, "variants-empty", variants=[])
    yield changed(S, "variants-17", variants=[{**one, "id": f"v{i}"} for i in range(17)])
    yield changed(S, "variant-id-climbs-out", variants=[{**one, "id": "../../etc"}])
    yield changed(S, "variant-id-twice", variants=[one, {**one, "file": "model.tflite"}])
    yield changed(S, "variant-file-unlisted", variants=[{**one, "file": "../model.onnx"}])
    yield changed(S, "variant-file-shared", variants=[one, {**one, "id": "onnx-b"}])
    yield changed(
        S, "variant-golden-not-npz", variants=[{**one, "golden": {"outputs": "model.onnx"}}]
    )
    yield changed(S, "variant-without-golden", variants=[{**one, "golden": None}])
    yield changed(S, "variant-peak-memory-zero",
                  variants=[{**one, "peak_memory_mb": {"onnxruntime": 0}}])  # fmt: skip
    yield changed(S, "variant-precision-int4", variants=[{**one, "precision": "int4"}])
    yield changed(S, "variant-built-for-megabyte", variants=[{**one, "built_for": "x" * 100_000}])

    long_component = "d" * 300 + "/x.bin"
    yield Spec(
        Case(k, "path-component-300-chars", (U,), "ENAMETOOLONG at unpack"),
        lambda: m.bundle({**m.files, long_component: b"x"}),
        agent=True,
    )
    yield Spec(
        Case(k, "path-5000-chars", (U,), "ENAMETOOLONG at unpack"),
        lambda: m.bundle({**m.files, "/".join(["p" * 50] * 100): b"x"}),
    )
    yield Spec(
        Case(k, "file-and-folder-same-prefix", (S,), "FileExistsError at unpack"),
        lambda: m.bundle({**m.files, "golden": b"x"}),
        agent=True,
    )
    yield Spec(
        Case(k, "listed-path-non-ascii", (U,)),
        lambda: m.bundle({**m.files, "rëport.md": b"x"}),
    )
    yield changed(S, "files-list", files=[])
    yield changed(
        S,
        "file-size-string",
        files={**good["files"], "model.onnx": {**good["files"]["model.onnx"], "size": "154355"}},
    )
    yield changed(
        S,
        "file-size-bool",
        files={**good["files"], "model.onnx": {**good["files"]["model.onnx"], "size": True}},
    )
    yield changed(
        S,
        "file-size-negative",
        files={**good["files"], "model.onnx": {**good["files"]["model.onnx"], "size": -1}},
    )
    yield changed(
        S,
        "file-sha-uppercase",
        files={
            **good["files"],
            "model.onnx": {
                **good["files"]["model.onnx"],
                "sha256": good["files"]["model.onnx"]["sha256"].upper(),
            },
        },
    )
    yield changed(S, "file-entry-string", files={**good["files"], "model.onnx": "sha"})
    yield changed(S, "formats-list", formats=["onnx"])
    yield changed(S, "formats-path-int", formats={"onnx": 5})
    yield changed(S, "formats-empty", formats={})
    yield changed(S, "schema-missing", schema=DROP)
    yield changed(S, "schema-int", schema=1)
    yield changed(S, "inputs-dict", inputs={"input": inputs[0]})
    yield changed(S, "inputs-missing", inputs=DROP)
    yield changed(S, "outputs-null", outputs=None)
    yield changed(S, "shape-dim-1e30", inputs=[{**inputs[0], "shape": [10**30, 1, 8, 8]}])
    yield changed(S, "shape-dim-2e40", inputs=[{**inputs[0], "shape": [2**40, 1, 8, 8]}])
    yield changed(S, "shape-dim-minus-5", inputs=[{**inputs[0], "shape": [-5, 1, 8, 8]}])
    yield changed(S, "shape-dim-bool", inputs=[{**inputs[0], "shape": [True, 1, 8, 8]}])
    yield changed(S, "shape-dim-float", inputs=[{**inputs[0], "shape": [1.5, 1, 8, 8]}])
    yield changed(S, "shape-string", inputs=[{**inputs[0], "shape": "1,1,8,8"}])
    yield changed(S, "shape-rank-100", inputs=[{**inputs[0], "shape": [1] * 100}])
    yield changed(S, "dtype-object", inputs=[{**inputs[0], "dtype": "object"}])
    yield changed(S, "dtype-int", outputs=[{**outputs[0], "dtype": 7}])
    yield changed(S, "tensor-name-list", inputs=[{**inputs[0], "name": ["input"]}])
    yield changed(S, "tensor-name-empty", inputs=[{**inputs[0], "name": ""}])
    yield changed(S, "tensor-name-newline", outputs=[{**outputs[0], "name": "logits\n"}])
    yield changed(S, "tensor-name-1000", outputs=[{**outputs[0], "name": "l" * 1000}])
    yield changed(S, "tensors-100", outputs=[{**outputs[0], "name": f"o{i}"} for i in range(100)])
    yield changed(S, "quantization-string", inputs=[{**inputs[0], "quantization": "int8"}])
    yield changed(
        S, "quantization-scale-string", inputs=[{**inputs[0], "quantization": {"scale": "big"}}]
    )
    yield changed(S, "labels-string", labels="0123456789")
    yield changed(S, "labels-ints", labels=list(range(10)))
    yield changed(S, "label-300-chars", labels=["x" * 300])
    yield changed(S, "created-int", created=20260101)
    yield changed(S, "key-id-list", key_id=["a"])
    yield changed(S, "figures-list", figures=[1])
    yield changed(
        S,
        "peak-memory-0.001",
        True,
        "was admitted",
        figures={"peak_memory_mb": {"onnxruntime": 0.001}},
    )
    yield changed(S, "peak-memory-negative", figures={"peak_memory_mb": {"onnxruntime": -100000}})
    yield changed(S, "peak-memory-zero", figures={"peak_memory_mb": {"onnxruntime": 0}})
    yield changed(S, "peak-memory-1e308", figures={"peak_memory_mb": {"onnxruntime": 1e308}})
    yield changed(S, "peak-memory-string", figures={"peak_memory_mb": {"onnxruntime": "28"}})
    yield changed(S, "peak-memory-bool", figures={"peak_memory_mb": {"onnxruntime": True}})
    yield changed(S, "peak-memory-list", figures={"peak_memory_mb": [28]})
    yield changed(
        S, "peak-memory-runtime-non-ascii", figures={"peak_memory_mb": {"onnxrüntime": 28}}
    )
    yield changed("bundle.agent_too_old", "min-agent-99", min_agent_version="99.0")
    yield changed(S, "min-agent-int", min_agent_version=1)
    yield changed(S, "min-agent-non-ascii", min_agent_version="\u0660.\u0661")


def _golden_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.golden"
    good = m.manifest()
    golden = good["golden"]
    images = np.asarray(samples()[0][:8], dtype=np.float32)
    # For references of zeros: a rule that allows 1e-3 (the sample's own allows its
    # logits an INT8 step or two, which is more than zeros may be given).
    narrow = {**golden, "tolerance": {"atol": 0.001, "rtol": 0.001}}

    def tol(name: str, atol: Any, note: str = "", agent: bool = False) -> Spec:
        return Spec(
            Case(k, name, (S,), note),
            lambda: m.bundle(golden={**golden, "tolerance": {"atol": atol, "rtol": 0.001}}),
            agent=agent,
        )

    yield tol("atol-1e308", 1e308, "disabled the check")
    yield tol("atol-string", "0.001", "disabled the check")
    yield tol("atol-negative", -0.1)
    yield tol("atol-bool", True)
    yield tol("atol-null", None)
    yield Spec(
        Case(k, "rtol-5", (S,)),
        lambda: m.bundle(golden={**golden, "tolerance": {"atol": 0.001, "rtol": 5}}),
    )
    yield Spec(
        Case(k, "atol-NaN-literal", (S,), "disabled the check"),
        lambda: m.bundle(
            raw_manifest=sub(dumps(m.manifest()).decode(), _atol_text(m.manifest()), '"atol": NaN')
        ),
    )

    def rule(name: str, tolerance: Any, klass: str = S, note: str = "") -> Spec:
        # A field out of its bounds is refused at verify; an allowance too wide for the
        # outputs only once they are read, before the replay.
        return Spec(Case(k, name, (klass,), note),
                    lambda: m.bundle(golden={**golden, "tolerance": tolerance}),
                    replay_golden if klass == GI else verify_only())  # fmt: skip

    sample_rule = golden["tolerance"]
    yield rule("max-steps-1e9", {"outputs": {"logits": {"quant_step": 0.1, "max_steps": 1e9}}},
               note="every INT8 output passes")  # fmt: skip
    yield rule("quant-step-negative", {"outputs": {"logits": {"quant_step": -0.1}}})
    yield rule(
        "range-share-1", {"families": {"cuda": {"range_share": 1.0}}}, note="the whole range"
    )
    yield rule("family-name-with-slash", {"families": {"cuda/../x": {"atol": 0.001}}})
    yield rule("families-100", {"families": {f"f{i}": {} for i in range(100)}})
    yield rule("top1-zero", {**sample_rule, "top1": {"logits": 0.0}}, note="a check of nothing")
    yield rule("top1-unknown-output", {"top1": {"probs": 1.0}})
    yield rule("formats-unknown", {"formats": {"coreml": {"atol": 0.001}}})
    yield rule("formats-nested", {"formats": {"onnx": {"formats": {"onnx": {}}}}})
    yield rule("unknown-field", {"atol": 0.001, "atl": 5.0}, note="a typo would widen nothing")
    yield rule("steps-within-the-field-bound-but-wide-for-the-outputs",
               {"outputs": {"logits": {"quant_step": 0.5, "max_steps": 64}}}, klass=GI,
               note="32 on logits of at most 18")  # fmt: skip

    def golden_file(name: str, data: bytes) -> Callable[[], Path]:
        return lambda: m.bundle({**m.files, name: data})

    inputs, outputs = "golden/inputs.npz", "golden/outputs-onnx.npz"
    f32 = "<f4"
    huge = zip_of([("input.npy", npy(f32, "(1000000000000, 1, 8, 8)", bytes(256)))])
    yield Spec(
        Case(k, "npy-shape-1e12", (GI,), "MemoryError; left its bundle directory behind"),
        golden_file(inputs, huge),
        agent=True,
    )
    yield Spec(
        Case(k, "npy-shape-1e12-in-outputs", (GI,)),
        golden_file(outputs, zip_of([("logits.npy", npy(f32, "(1000000000000, 10)"))])),
    )
    many = np.zeros((65536, 1, 8, 8), np.float32)
    yield Spec(
        Case(k, "65536-cases-compressed", (GI,), "346 KB bundle took the install to 900 MB"),
        golden_file(inputs, zip_of([("input.npy", npy_of(many))], method=8)),
    )
    yield Spec(
        Case(k, "deflate-bomb-80MB", (GI,)),
        golden_file(
            inputs,
            zip_of(
                [("input.npy", npy_of(np.zeros((80 * MB // 256, 1, 8, 8), np.float32)))], method=8
            ),
        ),
    )
    for descr, what in [
        ("|O", "object"),
        (">f4", "big-endian"),
        ("<c8", "complex"),
        ("<U8", "unicode"),
        ("|V16", "void"),
    ]:
        yield Spec(
            Case(k, f"npy-dtype-{what}", (GI,)),
            golden_file(inputs, zip_of([("input.npy", npy(descr, "(8, 1, 8, 8)", bytes(2048)))])),
        )
    yield Spec(
        Case(k, "npy-structured-dtype", (GI,)),
        golden_file(
            inputs,
            zip_of(
                [
                    (
                        "input.npy",
                        npy(
                            "",
                            "",
                            header="{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (8,), }",
                        ),
                    )
                ]
            ),
        ),
    )
    yield Spec(
        Case(k, "npy-header-code", (GI,), "numpy evaluates the header"),
        golden_file(
            inputs,
            zip_of(
                [
                    (
                        "input.npy",
                        npy(
                            "",
                            "",
                            header="{'descr': '<f4', 'fortran_order': False, 'shape': (__import__('os').getpid(),), }",
                        ),
                    )
                ]
            ),
        ),
    )
    yield Spec(
        Case(k, "npy-header-60000-bytes", (GI,)),
        golden_file(
            inputs,
            zip_of(
                [
                    (
                        "input.npy",
                        npy(f32, "(8, 1, 8, 8)", version=2, header="{" + " " * 60000 + "}")[:70000],
                    )
                ]
            ),
        ),
    )
    yield Spec(
        Case(k, "npy-version-4", (GI,)),
        golden_file(
            inputs, zip_of([("input.npy", npy(f32, "(8, 1, 8, 8)", bytes(2048), version=4))])
        ),
    )
    yield Spec(
        Case(k, "npy-not-npy", (GI,)), golden_file(inputs, zip_of([("input.npy", b"hello")]))
    )
    yield Spec(
        Case(k, "npy-size-mismatch", (GI,)),
        golden_file(inputs, zip_of([("input.npy", npy(f32, "(8, 1, 8, 8)", bytes(100)))])),
    )
    yield Spec(Case(k, "npz-not-a-zip", (GI,)), golden_file(inputs, b"not a zip at all" * 10))
    yield Spec(Case(k, "npz-truncated", (GI,)), golden_file(inputs, npz(input=images)[:-30]))
    yield Spec(
        Case(k, "npz-with-comment", (GI,)),
        golden_file(inputs, zip_of([("input.npy", npy_of(images))], comment=b"hi")),
    )
    yield Spec(
        Case(k, "npz-encrypted-flag", (GI,)),
        golden_file(inputs, zip_of([("input.npy", npy_of(images))], flags=1)),
    )
    yield Spec(
        Case(k, "npz-bzip2-method", (GI,)),
        golden_file(inputs, zip_of([("input.npy", npy_of(images))], method=12)),
    )
    yield Spec(
        Case(k, "npz-zip64-sizes", (GI,)),
        golden_file(
            inputs, zip_of([("input.npy", npy_of(images))], sizes=(0xFFFFFFFF, 0xFFFFFFFF))
        ),
    )
    yield Spec(
        Case(k, "npz-100-arrays", (GI,)),
        golden_file(
            outputs, zip_of([(f"a{i}.npy", npy_of(np.zeros(1, np.float32))) for i in range(100)])
        ),
    )
    yield Spec(
        Case(k, "npz-pickle-entry", (GI,)),
        golden_file(inputs, zip_of([("input.pkl", b"\x80\x04K\x01.")])),
    )
    yield Spec(
        Case(k, "npz-duplicate-entry", (GI,)),
        golden_file(inputs, zip_of([("input.npy", npy_of(images))] * 2)),
    )
    yield Spec(
        Case(k, "empty-outputs-file", (GI,), "disabled the check"),
        golden_file(outputs, zip_of([])),
    )
    yield Spec(Case(k, "empty-inputs-file", (GI,)), golden_file(inputs, zip_of([])))
    yield Spec(Case(k, "inputs-wrong-name", (GI,)), golden_file(inputs, npz(image=images)))
    yield Spec(
        Case(k, "inputs-wrong-dtype", (GI,)),
        golden_file(inputs, npz(input=images.astype(np.float64))),
    )
    yield Spec(
        Case(k, "inputs-wrong-rank", (GI,)), golden_file(inputs, npz(input=images.reshape(8, 64)))
    )
    yield Spec(
        Case(k, "outputs-unknown-name", (GI,)),
        golden_file(outputs, npz(logits=np.zeros((8, 10), np.float32), extra=np.zeros(1))),
    )
    # Harm in the values: replayed on a real onnxruntime session.
    want = np.zeros((8, 10), np.float32)
    yield Spec(
        Case(k, "expected-all-NaN", (GI,), "disabled the check"),
        golden_file(outputs, npz(logits=np.full((8, 10), np.nan, np.float32))),
        replay_golden,
        agent=True,
    )
    yield Spec(
        Case(k, "expected-one-inf", (GI,)),
        golden_file(
            outputs, npz(logits=np.where(np.eye(8, 10) > 0, np.inf, want).astype(np.float32))
        ),
        replay_golden,
    )
    yield Spec(
        Case(k, "expected-zero-size", (GI,)),
        golden_file(outputs, npz(logits=np.zeros((0, 10), np.float32))),
        replay_golden,
    )
    nan_inputs = {**m.files, inputs: npz(input=np.full_like(images, np.nan))}
    yield Spec(
        Case(k, "model-outputs-NaN", (GM,), "NaN in; NaN-aware on float models: test_golden.py"),
        lambda: m.bundle({**nan_inputs, outputs: npz(logits=want)}, golden=narrow),
        replay_golden,
        agent=True,
    )
    yield Spec(
        Case(k, "wrong-outputs-at-wide-tolerance", (GM,)),
        lambda: m.bundle(
            {**m.files, outputs: npz(logits=want + 100)},
            golden={**golden, "tolerance": {"atol": 10.0, "rtol": B.MAX_RTOL}},
        ),
        replay_golden,
    )
    yield Spec(
        Case(k, "atol-wider-than-the-outputs", (GI,), "atol 50 on logits of at most 18"),
        lambda: m.bundle(golden={**golden, "tolerance": {"atol": 50.0, "rtol": 0.0}}),
        replay_golden,
    )
    yield Spec(
        Case(k, "atol-1-on-zero-outputs", (GI,), "any output within 1 of zero passes"),
        lambda: m.bundle(
            {**m.files, outputs: npz(logits=np.zeros((8, 10), np.float32))},
            golden={**golden, "tolerance": {"atol": 1.0, "rtol": 0.0}},
        ),
        replay_golden,
    )
    good_npz = npz(input=images)
    crc_at = good_npz.index(b"PK\x01\x02") + 16  # the central directory's CRC-32
    yield Spec(
        Case(k, "npz-bad-crc", (GI,), "zipfile raises BadZipFile while numpy reads"),
        golden_file(inputs, good_npz[:crc_at] + b"\x00\x00\x00\x00" + good_npz[crc_at + 4 :]),
        replay_golden,
    )
    deflated = zip_of([("input.npy", npy_of(images))], method=8)
    body_at = deflated.index(b"PK\x01\x02") - 24  # the end of the data, past the header
    yield Spec(
        Case(k, "npz-corrupt-deflate-data", (GI,), "zlib.error"),
        golden_file(inputs, deflated[:body_at] + b"\xff" * 8 + deflated[body_at + 8 :]),
        replay_golden,
    )
    yield Spec(
        Case(k, "expected-wrong-shape", (GM,)),
        lambda: m.bundle(
            {**m.files, outputs: npz(logits=np.zeros((8, 11), np.float32))}, golden=narrow
        ),
        replay_golden,
    )


def _version_cases(m: Material) -> Iterator[Spec]:
    k = "bundle.version"

    def v(case: str, code: str, agent: bool = False, note: str = "", **changes: Any) -> Spec:
        return Spec(
            Case(k, case, (code,), note), lambda: m.bundle(**changes), install_version, agent
        )

    yield v(
        "build-metadata-not-newer",
        NOT_NEWER,
        True,
        "1.0.0+build7 installed over 1.0.0",
        version="1.0.0+build7",
    )
    yield v("pre-release-not-newer", NOT_NEWER, version="1.0.0-rc1")
    yield v("four-part-equal", NOT_NEWER, version="1.0.0.0")
    yield v("leading-zeros-equal", NOT_NEWER, version="01.0.0")
    yield v("older", NOT_NEWER, version="0.9.9")
    yield v("arabic-indic-digits", S, False, "parsed as 1.0.2", version="\u0661.\u0660.\u0662")
    yield v("mixed-arabic-indic", S, version="1.0.\u0662")
    yield v("fullwidth-digits", S, version="\uff11.0.1")
    yield v("superscript-digit", S, version="1.0.\u00b2")
    yield v("trailing-newline", S, note="$ in a regex", version="1.0.1\n")
    yield v("leading-space", S, version=" 1.0.1")
    yield v("empty-version", S, version="")
    yield v("version-int", S, version=2)
    yield v("version-list", S, version=[1, 0, 1])
    yield v("version-too-long", S, version="1.0.1-" + "a" * 100)
    yield v("version-five-parts", S, version="1.0.0.0.1")
    yield v("version-dangling-plus", S, version="1.0.1+")
    yield v("name-cyrillic", S, True, "installed, then every request 404s", name="digit\u0455")
    yield v("name-dotdot", S, name="..")
    yield v("name-dot", S, name=".")
    yield v("name-leading-dash", S, name="-digits")
    yield v("name-trailing-newline", S, name="digits\n")
    yield v("name-slash", S, name="a/b")
    yield v("name-65-chars", S, name="d" * 65)
    yield v("name-empty", S, name="")
    yield v("name-int", S, name=7)
    yield v("name-null", S, name=None)
    yield v("name-arabic-digit", S, name="digits\u0663")


# --------------------------------------------------------------------------- running


class RssSampler:
    """Peak RSS of this process while a block runs, sampled every 2 ms by a thread."""

    def __init__(self) -> None:
        self.proc = psutil.Process()

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        start = self.proc.memory_info().rss
        result = {"start": start / MB, "peak": start / MB}
        stop = threading.Event()

        def sample() -> None:
            peak = start
            while not stop.wait(0.002):
                peak = max(peak, self.proc.memory_info().rss)
            result["peak"] = max(peak, self.proc.memory_info().rss) / MB

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield result
        finally:
            stop.set()
            thread.join()


def _remove(path: Path) -> None:
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


def judge(spec: Spec, sampler: RssSampler) -> Outcome:
    path = spec.build()
    code: str | None = None
    message = ""
    with sampler.measure() as rss:
        start = time.perf_counter()
        try:
            spec.judge(path)
        except BundleError as exc:
            code, message = exc.code, str(exc)
        except Exception as exc:  # the contract is broken: record it, do not stop
            code, message = f"crash.{type(exc).__name__}", repr(exc)[:500]
        seconds = time.perf_counter() - start
    _remove(path)
    return Outcome(
        spec.case,
        code,
        message or ("accepted" if code is None else ""),
        seconds,
        peak_rss_mb=round(rss["peak"], 1),
        extra={"rss_growth_mb": round(rss["peak"] - rss["start"], 1)},
    )


def specs(m: Material) -> list[Spec]:
    return [
        *_tar_cases(m),
        *_end_cases(m),
        *_json_cases(m),
        *_manifest_cases(m),
        *_golden_cases(m),
        *_version_cases(m),
    ]


def serves_sample(agent: Any) -> str:
    """'' when the agent serves the sample 1.0.0 correctly, else what is wrong."""
    with agent.client() as client:
        meta = client.get_json("/v2/models/digits")
        if meta.get("versions") != [RUNNING_VERSION]:
            return f"serves {meta.get('versions')}"
        images, labels = samples()
        out = client.infer("digits", {"input": images})
    if (out["logits"].argmax(1) == labels).mean() < 0.9:
        return "answers wrongly"
    return ""


def agent_outcome(spec: Spec, refusal: Outcome, workdir: Path) -> Outcome:
    """Start a real agent whose state serves the sample, with `model.bundle` hostile."""
    case = Case("bundle.agent", spec.case.name, spec.case.expect, spec.case.note)
    path = spec.build()
    start = time.perf_counter()
    problem = ""
    peak = None
    try:
        with running_agent(workdir, base_config(workdir, bundle=path)) as agent:
            # `model.bundle` is checked in the background while `current` serves:
            # judge once its refusal is in the log (the deadline only guards a hang).
            deadline = time.monotonic() + 120
            while refusal.message[:80] not in agent.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            problem = serves_sample(agent)
            with agent.client() as client:  # its own watcher samples RSS from before the install
                peak = client.get_json("/v2/edgerun/status")["memory"]["peak_rss_mb"]
            output = agent.output()
        rc = agent.proc.returncode
    except AssertionError as exc:  # it did not start: the very failure of issue 7
        return Outcome(case, "agent.exited", str(exc)[-500:], time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)
    if "Traceback" in output:
        problem = problem or "a traceback in its log"
    if rc != 0:
        problem = problem or f"exit status {rc} on SIGTERM"
    if refusal.message[:80] not in output:
        problem = problem or "its log does not carry the refusal the reader gives"
    if problem:
        return Outcome(case, f"agent.{problem.split()[0]}", problem, time.perf_counter() - start)
    return Outcome(
        case,
        refusal.code,
        refusal.message,
        time.perf_counter() - start,
        peak_rss_mb=None if peak is None else round(peak, 1),
    )


def cli_outcome(spec: Spec) -> Outcome:
    """`edge-agent verify` on the bundle: refused with its code, exit 1, no traceback."""
    case = Case("bundle.cli", spec.case.name, spec.case.expect, spec.case.note)
    path = spec.build()
    start = time.perf_counter()
    args = [sys.executable, "-m", "agent.cli", "verify", "--key", str(DEMO_PUB), str(path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    peak = 0
    with contextlib.suppress(psutil.Error):
        child = psutil.Process(proc.pid)
        while proc.poll() is None:  # sampled until it exits: its RSS while it refuses
            peak = max(peak, child.memory_info().rss)
            time.sleep(0.005)
    stdout, stderr = (b.decode(errors="replace") for b in proc.communicate(timeout=120))
    seconds = time.perf_counter() - start
    path.unlink(missing_ok=True)
    m = re.match(r"REFUSED \[([a-z_.]+)\] \S+: (.*)", stdout, re.DOTALL)
    if proc.returncode != 1 or m is None or "Traceback" in stderr:
        detail = f"exit {proc.returncode}: {stdout[-300:]} {stderr[-700:]}"
        return Outcome(case, f"cli.exit{proc.returncode}", detail, seconds)
    return Outcome(case, m.group(1), m.group(2).strip(), seconds, peak_rss_mb=round(peak / MB, 1))


def prepare_state(workdir: Path) -> None:
    """An agent state dir that serves the sample 1.0.0 (as a device that ran a while)."""
    with running_agent(workdir, base_config(workdir)) as agent:
        assert serves_sample(agent) == ""


def run_corpus(workdir: Path, agent: bool = True) -> list[Outcome]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "bundles"
    out.mkdir(exist_ok=True)
    parts = unpack_sample(workdir / "sample")
    m = Material(parts, load_private_key(DEMO_KEY), out)
    sampler = RssSampler()
    outcomes = []
    agent_specs = []
    for spec in specs(m):
        outcome = judge(spec, sampler)
        outcomes.append(outcome)
        if spec.agent:
            agent_specs.append((spec, outcome))
    if agent:
        device = workdir / "device"
        device.mkdir(exist_ok=True)
        prepare_state(device)
        for spec, outcome in agent_specs:
            outcomes.append(agent_outcome(spec, outcome, device))
        leftovers = sorted(p.name for p in (device / "state/bundles").iterdir())
        if len(leftovers) != 1:  # only the sample: no refused bundle left a directory
            outcomes.append(
                Outcome(Case("bundle.agent", "no-leftovers", ("none",)), "leftover", str(leftovers))
            )
        for spec, _ in agent_specs:
            if spec.judge not in (replay_golden, install_version):  # what verify alone refuses
                outcomes.append(cli_outcome(spec))
    B.remove_unpacked(workdir / "sample")
    shutil.rmtree(out, ignore_errors=True)
    return outcomes


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="er-", dir="/tmp") as tmp:
        for o in run_corpus(Path(tmp)):
            mark = "ok  " if o.ok else "FAIL"
            print(
                f"{mark} {o.case.klass:16} {o.case.name:40} {o.code or '-':24} {o.seconds:7.3f}s "
                f"{o.peak_rss_mb or 0:7.1f}MB  {o.message[:90]}"
            )


if __name__ == "__main__":
    main()
