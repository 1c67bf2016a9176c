"""Golden `.npz` files inspected before numpy allocates anything.

`np.load` trusts the `.npy` header: a header claiming shape (1e12, 1, 8, 8) is a
MemoryError, an object dtype wants pickle. So the zip directory and each array's
header are read here first, with limits: stored or deflated entries only, no
encryption, no zip64, at most `max_arrays` arrays, an allow-list of dtypes, and
the arrays' total size capped. The header is matched by a regular expression
(never evaluated), and its declared size must equal the entry's size, so what
np.load later reads is exactly what was measured here.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from agent.bundle_errors import GoldenFileError
from agent.names import shown

DTYPES = {
    "|b1": "bool",
    "|u1": "uint8",
    "|i1": "int8",
    "<u2": "uint16",
    "<i2": "int16",
    "<u4": "uint32",
    "<i4": "int32",
    "<u8": "uint64",
    "<i8": "int64",
    "<f2": "float16",
    "<f4": "float32",
    "<f8": "float64",
}
MAX_RANK = 16
MAX_DIM = 2**31 - 1
_MAX_HEADER = 4096  # numpy writes ~128 bytes; it refuses over 10,000 itself
_MAX_DIRECTORY = 1 << 16
_EOCD = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_HEADER = re.compile(
    r"\{\s*'descr':\s*'(?P<descr>[^']{1,8})',\s*'fortran_order':\s*(?:True|False),"
    r"\s*'shape':\s*\((?P<shape>[0-9, ]{0,200})\),?\s*\}\s*",
    re.ASCII,
)
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,256}", re.ASCII)


@dataclass(frozen=True)
class ArrayHeader:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class _Window:
    """Bytes [offset, offset + size) of a file: the npz may sit inside a bundle archive."""

    def __init__(self, fh: BinaryIO, offset: int, size: int) -> None:
        self.fh, self.offset, self.size = fh, offset, size

    def read(self, at: int, n: int) -> bytes:
        if at < 0 or n < 0 or at + n > self.size:
            raise GoldenFileError(f"reads past the end of the file (offset {at}, {n} bytes)")
        self.fh.seek(self.offset + at)
        data = self.fh.read(n)
        if len(data) != n:
            raise GoldenFileError("is truncated")
        return data


def inspect_npz(
    fh: BinaryIO, offset: int, size: int, label: str, max_arrays: int, max_bytes: int
) -> dict[str, ArrayHeader]:
    """Headers of the arrays in the .npz at `fh[offset:offset+size]`, keyed by name."""
    try:
        return _inspect(_Window(fh, offset, size), max_arrays, max_bytes)
    except GoldenFileError as exc:
        raise GoldenFileError(f"golden file {label}: {exc}") from None
    except OSError as exc:
        raise GoldenFileError(f"golden file {label}: cannot read: {exc.strerror}") from None


def _inspect(w: _Window, max_arrays: int, max_bytes: int) -> dict[str, ArrayHeader]:
    if w.size < _EOCD.size:
        raise GoldenFileError(f"is {w.size} bytes, too short for a .npz (zip) file")
    sig, disk, cd_disk, n_here, n_total, cd_size, cd_offset, comment = _EOCD.unpack(
        w.read(w.size - _EOCD.size, _EOCD.size)
    )
    if sig != b"PK\x05\x06" or comment:
        raise GoldenFileError("is not a .npz file as numpy writes it (no zip end record)")
    if disk or cd_disk or n_here != n_total or 0xFFFF in (n_here, n_total):
        raise GoldenFileError("is a multi-disk or zip64 archive; a .npz is neither")
    if n_total == 0:
        raise GoldenFileError("holds no arrays; an empty golden file checks nothing")
    if n_total > max_arrays:
        raise GoldenFileError(f"holds {n_total} arrays; the cap is {max_arrays}")
    if cd_size > _MAX_DIRECTORY or cd_offset + cd_size != w.size - _EOCD.size:
        raise GoldenFileError("has a zip directory that does not end at its end record")
    directory = w.read(cd_offset, cd_size)
    arrays: dict[str, ArrayHeader] = {}
    total = 0
    pos = 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > len(directory):
            raise GoldenFileError("has a truncated zip directory")
        (sig, _made, _need, flags, method, _t, _d, _crc, csize, usize, nlen, xlen, clen,
         _disk, _iattr, _eattr, local) = _CENTRAL.unpack_from(directory, pos)  # fmt: skip
        raw_name = directory[pos + _CENTRAL.size : pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + xlen + clen
        if sig != b"PK\x01\x02" or pos > len(directory):
            raise GoldenFileError("has a corrupt zip directory entry")
        entry = raw_name.decode("ascii", "replace")
        if not entry.endswith(".npy") or not _ARRAY_NAME.fullmatch(entry[:-4]):
            raise GoldenFileError(
                f"has entry {shown(entry)}; entries are NAME.npy with ASCII names"
            )
        name = entry[:-4]
        if name in arrays:
            raise GoldenFileError(f"has array {name!r} twice")
        if flags & 0x1:
            raise GoldenFileError(f"array {name!r} is encrypted")
        if method not in (0, 8):
            raise GoldenFileError(f"array {name!r} uses zip method {method}; only stored/deflate")
        if 0xFFFFFFFF in (csize, usize, local):
            raise GoldenFileError(f"array {name!r} needs zip64; golden arrays are small")
        if method == 0 and csize != usize:
            raise GoldenFileError(f"array {name!r} is stored with two different sizes")
        header = _array_header(w, name, raw_name, local, method, csize, usize, cd_offset)
        total += header.nbytes
        if total > max_bytes:
            raise GoldenFileError(
                f"arrays hold more than {max_bytes} bytes (at {name!r}, shape "
                f"{list(header.shape)}); the cap is {max_bytes}"
            )
        arrays[name] = header
    return arrays


def _array_header(
    w: _Window, name: str, raw_name: bytes, local: int, method: int, csize: int, usize: int,
    cd_offset: int,
) -> ArrayHeader:  # fmt: skip
    sig, *_, nlen, xlen = _LOCAL.unpack(w.read(local, _LOCAL.size))
    if sig != b"PK\x03\x04" or w.read(local + _LOCAL.size, nlen) != raw_name:
        raise GoldenFileError(f"array {name!r}: its local header does not match the directory")
    start = local + _LOCAL.size + nlen + xlen
    if start + csize > cd_offset:
        raise GoldenFileError(f"array {name!r} overlaps the zip directory")
    want = min(usize, 10 + _MAX_HEADER)
    if method == 0:
        head = w.read(start, want)
    else:
        inflater = zlib.decompressobj(-15)
        try:
            head = inflater.decompress(w.read(start, min(csize, 1 << 16)), want)
        except zlib.error as exc:
            raise GoldenFileError(f"array {name!r} is not valid deflate data: {exc}") from None
    return _parse_npy(name, head, usize)


def _parse_npy(name: str, head: bytes, usize: int) -> ArrayHeader:
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        raise GoldenFileError(f"array {name!r} is not a .npy array")
    major = head[6]
    if major == 1:
        hlen, start = struct.unpack_from("<H", head, 8)[0], 10
    elif major in (2, 3) and len(head) >= 12:
        hlen, start = struct.unpack_from("<I", head, 8)[0], 12
    else:
        raise GoldenFileError(f"array {name!r} has .npy format version {major}")
    if hlen > _MAX_HEADER or start + hlen > len(head):
        raise GoldenFileError(f"array {name!r} has a {hlen}-byte .npy header; cap {_MAX_HEADER}")
    text = head[start : start + hlen].decode("latin-1")
    m = _HEADER.fullmatch(text)
    if m is None:
        raise GoldenFileError(f"array {name!r} has a .npy header numpy would not write")
    descr = m.group("descr")
    if descr not in DTYPES:
        raise GoldenFileError(
            f"array {name!r} has dtype {descr!r}; allowed: {', '.join(sorted(DTYPES.values()))}"
            " (little-endian, no objects)"
        )
    dims = [d.strip() for d in m.group("shape").split(",")]
    if dims and dims[-1] == "":
        dims.pop()
    if (
        len(dims) > MAX_RANK
        or not all(d.isdigit() and len(d) <= 10 for d in dims)
        or any(int(d) > MAX_DIM for d in dims)
    ):
        raise GoldenFileError(
            f"array {name!r} has shape ({m.group('shape')}); the caps are rank {MAX_RANK} "
            f"and dimensions up to {MAX_DIM}"
        )
    shape = tuple(int(d) for d in dims)
    itemsize = int(descr[2:])
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    if start + hlen + nbytes != usize:
        raise GoldenFileError(
            f"array {name!r} claims shape {list(shape)} ({nbytes} bytes of data) but its entry "
            f"holds {usize - start - hlen}"
        )
    return ArrayHeader(name, DTYPES[descr], shape, nbytes)


__all__ = ["DTYPES", "ArrayHeader", "GoldenFileError", "inspect_npz"]
