"""The bundle's archive format: a strict subset of POSIX ustar, read and written here.

A bundle is our own format, so the reader accepts exactly what `write_bundle`
writes and nothing of tar's history: 512-byte ustar headers (magic "ustar\\0",
version "00") with a valid checksum, sizes in octal digits only (no base-256),
typeflag '0' (or NUL) only: no pax or GNU extension headers, links, devices,
fifos or directory entries. Names are ASCII and checked by agent.names. The
archive ends with two zero blocks, and nothing but zero bytes may follow them.

Everything here is read before the signature is checked, so nothing is
allocated beyond one header block, and every size is checked against the file's
length and the caps before a byte of the member is read. Time is linear in the
file's size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import BinaryIO

from agent.bundle_errors import BundleFormatError, OversizeError, UnsafeMemberError
from agent.names import path_problem, shown

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
_CHUNK = 1 << 20
MAGIC = b"ustar\x0000"  # magic "ustar\0" then version "00": POSIX.1-1988 ustar
_OCTAL = re.compile(rb"([0-7]{1,12})[\x00 ]*")

_REFUSED_TYPES = {
    b"1": ("a hard link", UnsafeMemberError),
    b"2": ("a symbolic link", UnsafeMemberError),
    b"3": ("a character device or fifo", UnsafeMemberError),
    b"4": ("a block device or fifo", UnsafeMemberError),
    b"6": ("a device or fifo", UnsafeMemberError),
    b"5": ("a directory entry", UnsafeMemberError),
    b"7": ("a contiguous file (typeflag '7')", BundleFormatError),
    b"x": ("a pax extended header", BundleFormatError),
    b"g": ("a pax global header", BundleFormatError),
    b"L": ("a GNU long-name header", BundleFormatError),
    b"K": ("a GNU long-link header", BundleFormatError),
}


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    header_offset: int
    data_offset: int


def _octal(field: bytes, what: str, at: int) -> int:
    if field and field[0] & 0x80:
        raise BundleFormatError(
            f"tar header at offset {at}: {what} is in base-256; bundles use octal digits only"
        )
    m = _OCTAL.fullmatch(field)
    if m is None:
        raise BundleFormatError(
            f"tar header at offset {at}: {what} field {shown(field)} is not octal digits"
        )
    return int(m.group(1), 8)


def _text(field: bytes, what: str, at: int) -> str:
    """A NUL-padded header string: everything after the first NUL must be NUL too."""
    text, _, rest = field.partition(b"\x00")
    if rest.count(0) != len(rest):
        raise BundleFormatError(f"tar header at offset {at}: {what} has bytes after its NUL")
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise UnsafeMemberError(
            f"archive member at offset {at}: {what} {shown(text)} is not ASCII"
        ) from None


def checksum(block: bytes) -> int:
    # The checksum field itself counts as eight spaces.
    return sum(block[:148]) + 8 * 0x20 + sum(block[156:])


class UstarReader:
    """Walks the members of one archive in order; `read` streams the current member."""

    def __init__(
        self,
        fh: BinaryIO,
        file_size: int,
        label: str,
        max_members: int,
        max_member_bytes: int,
        member_cap_hint: str = "",
        members_cap_hint: str = "",
    ) -> None:
        self.fh = fh
        self.file_size = file_size
        self.label = label
        self.max_members = max_members
        self.max_member_bytes = max_member_bytes
        self.member_cap_hint = member_cap_hint
        self.members_cap_hint = members_cap_hint
        self.count = 0
        self.pos = 0  # where the next header starts
        self._left = 0  # bytes of the current member not yet read
        self._data_pos = 0  # where they start; others may seek the file in between
        self._cur: Member | None = None

    def next(self) -> Member | None:
        """The next member's header, or None after a well-formed end of archive."""
        if self._cur is not None:
            self._finish_member(self._cur)
        at = self.pos
        block = self._block(at)
        if block == ZERO_BLOCK:
            self._check_end(at)
            return None
        member = self._header(block, at)
        self.count += 1
        if self.count > self.max_members:
            raise OversizeError(
                f"archive has more than {self.max_members} members"
                + (f" ({self.members_cap_hint})" if self.members_cap_hint else "")
            )
        self._cur = member
        self._left = member.size
        self._data_pos = member.data_offset
        return member

    def read(self, n: int) -> bytes:
        """Up to `n` bytes of the current member's data (b"" at its end)."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        self.fh.seek(self._data_pos)
        data = self.fh.read(n)
        if len(data) != n:
            raise BundleFormatError(f"archive is truncated in {self._name()!r}")
        self._left -= n
        self._data_pos += n
        return data

    def _name(self) -> str:
        return "" if self._cur is None else self._cur.name

    def _block(self, at: int) -> bytes:
        self.fh.seek(at)
        block = self.fh.read(BLOCK)
        if len(block) == BLOCK:
            return block
        if at == 0:
            raise BundleFormatError(
                f"{self.label} is not a tar archive: it is {self.file_size} bytes, "
                "shorter than one header"
            )
        raise BundleFormatError(
            f"archive is truncated at offset {at}: it ends without the two zero blocks "
            "that close a tar archive"
        )

    def _header(self, block: bytes, at: int) -> Member:
        stored = block[148:156]
        try:
            want = _octal(stored, "checksum", at)
        except BundleFormatError:
            want = -1
        if want != checksum(block) or block[257:265] != MAGIC:
            if at == 0:
                raise BundleFormatError(
                    f"{self.label} is not a tar archive as write_bundle writes it "
                    "(ustar header with a valid checksum)"
                )
            what = "bad checksum" if want != checksum(block) else "not a ustar header"
            raise BundleFormatError(
                f"archive is corrupt: the block at offset {at} is not a member header "
                f"({what}); a junk block would hide the members after it"
            )
        name = _text(block[0:100], "name", at)
        prefix = _text(block[345:500], "name prefix", at)
        full = f"{prefix}/{name}" if prefix else name
        kind = block[156:157]
        if kind not in (b"0", b"\x00"):
            what, error = _REFUSED_TYPES.get(kind, (f"of tar type {kind!r}", BundleFormatError))
            link = _text(block[157:257], "link name", at)
            to = f" to {shown(link)}; links are refused" if link else ""
            raise error(
                f"archive member {shown(full)} is {what}{to}; "
                "a bundle holds regular files only (plain ustar, as write_bundle writes)"
            )
        if block[157:257] != bytes(100):
            raise BundleFormatError(f"archive member {shown(full)} has a link name; it is a file")
        problem = path_problem(full)
        if problem is not None:
            raise UnsafeMemberError(f"archive member {problem}")
        size = _octal(block[124:136], f"size of {full!r}", at)
        if size > self.max_member_bytes:
            raise OversizeError(
                f"archive member {full!r} is {size} bytes; the cap is {self.max_member_bytes}"
                + (f" ({self.member_cap_hint})" if self.member_cap_hint else "")
            )
        data_at = at + BLOCK
        end = data_at + _padded(size)
        if end > self.file_size:
            raise BundleFormatError(
                f"archive is truncated in {full!r}: it needs {size} bytes at offset "
                f"{data_at}; the file ends at {self.file_size}"
            )
        self.pos = end
        return Member(full, size, at, data_at)

    def _finish_member(self, member: Member) -> None:
        data_end = member.data_offset + member.size
        pad = _padded(member.size) - member.size
        if pad:
            self.fh.seek(data_end)
            padding = self.fh.read(pad)
            if padding.count(0) != pad:
                raise BundleFormatError(
                    f"archive is corrupt: the padding after {member.name!r} is not zeros"
                )
        self._cur = None
        self._left = 0

    def _check_end(self, at: int) -> None:
        second = self._block(at + BLOCK)
        if second != ZERO_BLOCK:
            raise BundleFormatError(
                f"archive is corrupt: a zero block at offset {at} is followed by data; an "
                "archive ends with two zero blocks and a member may not hide after one"
            )
        pos = at + 2 * BLOCK
        self.fh.seek(pos)
        while chunk := self.fh.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                first = pos + next(i for i, b in enumerate(chunk) if b)
                raise BundleFormatError(
                    f"archive has data after its end (at offset {first}); only zero "
                    "padding may follow the two end blocks"
                )
            pos += len(chunk)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _field(value: int, width: int) -> bytes:
    return b"%0*o\x00" % (width - 1, value)


def header(name: str, size: int, mtime: int) -> bytes:
    """The ustar header write_bundle writes for a regular file (mode 0644, root:root)."""
    problem = path_problem(name)
    if problem is not None:
        raise UnsafeMemberError(f"archive member {problem}")
    raw = name.encode("ascii")
    prefix = b""
    if len(raw) > 100:
        # Split at a '/' so that the tail fits the name field and the head the prefix.
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise UnsafeMemberError(f"archive member {name!r} cannot be split into ustar fields")
        prefix, raw = raw[:cut], raw[cut + 1 :]
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = _field(0o644, 8)
    block[108:116] = _field(0, 8)
    block[116:124] = _field(0, 8)
    block[124:136] = _field(size, 12)
    block[136:148] = _field(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = MAGIC
    block[265:269] = b"root"
    block[297:301] = b"root"
    block[329:337] = _field(0, 8)
    block[337:345] = _field(0, 8)
    block[345 : 345 + len(prefix)] = prefix
    block[148:156] = b"%06o\x00 " % checksum(bytes(block))
    return bytes(block)


def padding(size: int) -> bytes:
    return bytes(_padded(size) - size)


END = bytes(2 * BLOCK)

__all__ = ["BLOCK", "END", "Member", "UstarReader", "checksum", "header", "padding"]
