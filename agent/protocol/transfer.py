"""Wire formats of MQTT bundle transfers: the chunk (console -> device) and the "need"
message (device -> console).

A chunk travels on `edgerun/v1/{device}/bundle/{transfer_id}` as a fixed binary
header and the payload (JSON + base64 would spend a third of a poor link on
padding). All integers big-endian::

    offset size  field
    0      4     magic b"ERC1"
    4      1     version (1)
    5      1     flags (0; others refused)
    6      4     index          (0 .. total-1)
    10     4     total          chunk count, ceil(bundle_size / chunk_size)
    14     4     chunk_size     every chunk but the last carries exactly this many bytes
    18     8     bundle_size    the signed size
    26     32    bundle_sha256  the signed sha256 (binary)
    58     32    chunk_sha256   sha256 of this payload
    90     4     payload_len
    94     ...   payload        exactly payload_len bytes, nothing after

A "need" message on `…/bundle/{transfer_id}/need` (QoS 1) is compact JSON:
`{"v": 1, "transfer", "sha256", "size", "total": int|null, "missing": [[start, end), ...],
"reason": "start"|"silence"|"reconnect"|"gap"}` (`gap`: the last chunk asked for
arrived and some before it did not): `total` null (no chunk seen yet) means
"everything"; otherwise `missing` lists half-open ranges of chunk indexes, at most
MAX_RANGES of them (the rest is asked for in the next round).

`decode_chunk` and `decode_need` raise only `TransferError`, whose `reason` is a
short stable word (for counters) and whose message names the bad value and the rule.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Literal

from agent.names import is_name, shown

MAGIC = b"ERC1"
VERSION = 1
HEADER = struct.Struct(">4sBBIIIQ32s32sI")
HEADER_BYTES = HEADER.size  # 94
MIN_CHUNK = 256
MAX_CHUNK = 64 * 1024  # well under the device's MQTT v5 maximum packet size
DEFAULT_CHUNK = 32 * 1024
MAX_TOTAL = 1 << 24  # chunks per transfer (a 1 TiB bundle at 64 KiB chunks)
MAX_RANGES = 256
MAX_NEED_BYTES = 16 * 1024
NeedReason = Literal["start", "silence", "reconnect", "gap"]
_REASONS = ("start", "silence", "reconnect", "gap")


class TransferError(ValueError):
    """A chunk or need message that breaks the format; `reason` is a stable short word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def chunk_count(size: int, chunk_size: int) -> int:
    return max(1, math.ceil(size / chunk_size))


@dataclass(frozen=True)
class Chunk:
    index: int
    total: int
    chunk_size: int
    bundle_size: int
    bundle_sha256: str  # hex
    payload: bytes

    @property
    def offset(self) -> int:
        return self.index * self.chunk_size

    def encode(self) -> bytes:
        return (
            HEADER.pack(
                MAGIC, VERSION, 0, self.index, self.total, self.chunk_size, self.bundle_size,
                bytes.fromhex(self.bundle_sha256), hashlib.sha256(self.payload).digest(),
                len(self.payload),
            )
            + self.payload
        )  # fmt: skip


def expected_length(index: int, total: int, chunk_size: int, bundle_size: int) -> int:
    return chunk_size if index < total - 1 else bundle_size - (total - 1) * chunk_size


def decode_chunk(data: bytes) -> Chunk:
    """A chunk, checked against itself: layout, lengths and its own hash."""
    if len(data) < HEADER_BYTES:
        raise TransferError(
            "truncated",
            f"chunk of {len(data)} bytes is shorter than its {HEADER_BYTES}-byte header",
        )
    magic, version, flags, index, total, chunk_size, size, bsha, csha, plen = HEADER.unpack_from(
        data
    )
    if magic != MAGIC:
        raise TransferError("magic", f"not an edgerun chunk (magic {shown(magic)}, want b'ERC1')")
    if version != VERSION or flags != 0:
        raise TransferError(
            "version", f"chunk format version {version} flags {flags}: only version 1, flags 0"
        )
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise TransferError(
            "layout", f"chunk size {chunk_size} outside {MIN_CHUNK}..{MAX_CHUNK} bytes"
        )
    if size < 1 or not 1 <= total <= MAX_TOTAL or total != chunk_count(size, chunk_size):
        raise TransferError(
            "layout",
            f"total {total} chunks does not fit a {size}-byte bundle in {chunk_size}-byte "
            f"chunks (want {chunk_count(size, chunk_size) if size >= 1 else 'a size >= 1'})",
        )
    if index >= total:
        raise TransferError("index", f"chunk index {index} outside 0..{total - 1}")
    if plen != len(data) - HEADER_BYTES:
        raise TransferError(
            "length",
            f"chunk {index} says {plen} payload bytes and carries {len(data) - HEADER_BYTES}",
        )
    want = expected_length(index, total, chunk_size, size)
    if plen != want:
        raise TransferError(
            "length", f"chunk {index} of {total} carries {plen} bytes, the layout says {want}"
        )
    payload = bytes(data[HEADER_BYTES:])
    if hashlib.sha256(payload).digest() != csha:
        raise TransferError("hash", f"chunk {index}: payload does not match its sha256")
    return Chunk(index, total, chunk_size, size, bsha.hex(), payload)


def chunks_of(data: bytes, chunk_size: int = DEFAULT_CHUNK) -> list[Chunk]:
    """The console side: a whole bundle cut into chunks."""
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise TransferError("layout", f"chunk size {chunk_size} outside {MIN_CHUNK}..{MAX_CHUNK}")
    sha = hashlib.sha256(data).hexdigest()
    total = chunk_count(len(data), chunk_size)
    return [
        Chunk(i, total, chunk_size, len(data), sha, data[i * chunk_size : (i + 1) * chunk_size])
        for i in range(total)
    ]


@dataclass(frozen=True)
class Need:
    transfer_id: str
    sha256: str
    size: int
    total: int | None  # None: no chunk seen yet, send everything
    missing: tuple[tuple[int, int], ...]  # half-open index ranges
    reason: NeedReason = "start"

    def indexes(self) -> list[int]:
        if self.total is None:
            return []
        return [i for start, end in self.missing for i in range(start, end)]

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "v": 1, "transfer": self.transfer_id, "sha256": self.sha256, "size": self.size,
            "total": self.total, "missing": [list(r) for r in self.missing], "reason": self.reason,
        }  # fmt: skip
        return json.dumps(body, separators=(",", ":")).encode("ascii")


def ranges_of(missing: list[int], limit: int = MAX_RANGES) -> tuple[tuple[int, int], ...]:
    """Sorted indexes as at most `limit` half-open ranges (the first ones)."""
    out: list[tuple[int, int]] = []
    for i in missing:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        elif len(out) >= limit:
            break
        else:
            out.append((i, i + 1))
    return tuple(out)


def decode_need(data: bytes) -> Need:
    if len(data) > MAX_NEED_BYTES:
        raise TransferError(
            "too_large", f"need message of {len(data)} bytes (max {MAX_NEED_BYTES})"
        )
    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TransferError(
            "malformed", f"need message is not JSON: {shown(str(exc), 80)}"
        ) from None
    if not isinstance(raw, dict):
        raise TransferError("malformed", "need message must be a JSON object")
    unknown = set(raw) - {"v", "transfer", "sha256", "size", "total", "missing", "reason"}
    if unknown or raw.get("v") != 1:
        raise TransferError(
            "malformed",
            f"need message: version must be 1 and no unknown keys ({sorted(unknown)[:4]})",
        )
    tid, sha, size, total = (
        raw.get("transfer"),
        raw.get("sha256"),
        raw.get("size"),
        raw.get("total"),
    )
    if not is_name(tid):
        raise TransferError(
            "malformed", f"need: transfer {shown(tid)} must be 1-64 of A-Za-z0-9._-"
        )
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise TransferError(
            "malformed", f"need: sha256 {shown(sha)} must be 64 lowercase hex digits"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise TransferError("malformed", f"need: size {shown(size)} must be a positive integer")
    if total is not None and (not _int(total) or not 1 <= total <= MAX_TOTAL):
        raise TransferError(
            "malformed", f"need: total {shown(total)} must be 1..{MAX_TOTAL} or null"
        )
    reason = raw.get("reason", "start")
    if reason not in _REASONS:
        raise TransferError("malformed", f"need: reason {shown(reason)} must be one of {_REASONS}")
    missing = raw.get("missing", [])
    if not isinstance(missing, list) or len(missing) > MAX_RANGES:
        raise TransferError(
            "malformed", f"need: missing must be a list of at most {MAX_RANGES} ranges"
        )
    ranges: list[tuple[int, int]] = []
    for r in missing:
        ok = isinstance(r, list) and len(r) == 2 and _int(r[0]) and _int(r[1])
        if not ok or total is None or not 0 <= r[0] < r[1] <= total:
            raise TransferError(
                "malformed", f"need: range {shown(r)} must be [start, end) within 0..{total}"
            )
        ranges.append((r[0], r[1]))
    return Need(str(tid), sha, size, total, tuple(ranges), reason)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


__all__ = [
    "DEFAULT_CHUNK",
    "HEADER_BYTES",
    "MAX_CHUNK",
    "MAX_RANGES",
    "MIN_CHUNK",
    "Chunk",
    "Need",
    "TransferError",
    "chunk_count",
    "chunks_of",
    "decode_chunk",
    "decode_need",
    "expected_length",
    "ranges_of",
]
