"""Every refusal of a bundle: one root (`BundleError`), one stable `code` per rule.

Kept apart from agent.bundle so the modules the reader is made of (ustar, npz,
strictjson) can raise them without importing the reader.
"""

from __future__ import annotations


class BundleError(Exception):
    """Base of every bundle refusal. `code` is stable and machine-readable."""

    code = "bundle.invalid"


class BundleFormatError(BundleError):
    """Not a strict ustar archive as write_bundle writes it, or a truncated/corrupt one."""

    code = "bundle.format"


class UnsafeMemberError(BundleError):
    """Unsafe path, link, device, fifo, directory entry or duplicate member."""

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
    """Unknown schema, or a manifest field of the wrong type, value or size."""

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


class GoldenFileError(BundleError):
    """A golden .npz that is malformed, over its caps, empty, or cannot be a reference."""

    code = "bundle.golden_invalid"


class UnpackError(BundleError):
    """Writing the verified files failed (disk full, permissions): the device's side."""

    code = "bundle.unpack_failed"


__all__ = [
    "BundleError",
    "BundleFormatError",
    "GoldenFileError",
    "HashMismatchError",
    "IncompatibleAgentError",
    "MissingFileError",
    "MissingManifestError",
    "OversizeError",
    "SchemaError",
    "SignatureError",
    "SizeMismatchError",
    "UnlistedFileError",
    "UnpackError",
    "UnsafeMemberError",
    "UntrustedSignerError",
    "VersionNotNewerError",
]
