"""Triton's system shared-memory extension: regions of /dev/shm files, mapped once.

A client (tritonclient.utils.shared_memory, or anything that writes a POSIX shm
object) registers a region by name: the shm object's key, an offset and a byte size.
Inputs then name a region instead of carrying data, and the agent reads the tensor
from the mapping in place (no copy through the socket, no copy into the request);
outputs naming a region are written into it, and the reply carries only their shape.

What is checked, and why:
- only objects directly under /dev/shm (a key is a name, never a path; opened with
  O_NOFOLLOW relative to the directory), regular files only;
- offset and byte size inside the object's real size at registration, and again at
  every use (a client that shrank its object gets a clear error instead of the SIGBUS
  that touching a page past the end would raise);
- who: over the Unix socket the object must belong to the connecting user (SO_PEERCRED)
  unless that is root; over TCP only with `api.token` set, and then only objects owned
  by the agent's own user (a caller with a token may not make the agent read or write
  another user's memory);
- how much: `api.max_shm_regions` and `api.max_shm_mb`, and every region's bytes are
  charged to the API's memory headroom (agent/api/bodies.py, the one owner of memory the
  API holds beyond what the RSS watcher saw) from registration to unregistration: its
  pages join the agent's RSS as soon as a request touches them.

The one race left: a client that truncates its object while a request reads it can
still get the agent a SIGBUS. Only the object's owner (or root) can do that, and
only to an agent it was allowed to register with.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.api.http import Caller
from agent.errors import ServingError

SHM_ROOT = Path("/dev/shm")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# POSIX shm names: one component with an optional leading slash (shm_open's form).
KEY_PATTERN = re.compile(r"/?[A-Za-z0-9_.:-]{1,250}")
MB = 1024 * 1024


class ShmError(ServingError):
    """A shared-memory request refused; the region registry is unchanged."""


class ShmInvalidError(ShmError):
    code = "shm.invalid"
    status = 400


class ShmNotFoundError(ShmError):
    code = "shm.not_found"
    status = 404


class ShmExistsError(ShmError):
    code = "shm.exists"
    status = 409


class ShmForbiddenError(ShmError):
    code = "shm.forbidden"
    status = 403


class ShmLimitError(ShmError):
    code = "shm.limit"
    status = 413


class RegionAccess(Protocol):
    """What an infer request may do with regions (the registry, or a refusal)."""

    def read(
        self, params: dict[str, Any], where: str, dtype: np.dtype[Any], count: int
    ) -> np.ndarray: ...

    def target(self, params: dict[str, Any], where: str) -> tuple[Region, int, int]: ...


_TCP_REFUSED = (
    "shared memory over TCP needs api.token (then only objects owned by the agent's "
    "user); use the Unix socket"
)


class _Refused:
    """Region access for a caller who may not use shared memory (one instance)."""

    def read(
        self, params: dict[str, Any], where: str, dtype: np.dtype[Any], count: int
    ) -> np.ndarray:
        raise ShmForbiddenError(f"{where}: {_TCP_REFUSED}")

    def target(self, params: dict[str, Any], where: str) -> tuple[Region, int, int]:
        raise ShmForbiddenError(f"{where}: {_TCP_REFUSED}")


_REFUSED = _Refused()


class Headroom(Protocol):
    """The memory owner regions are charged to (agent.api.bodies.BodyBudget)."""

    def pin(self, size: int, what: str) -> int: ...

    def unpin(self, size: int) -> None: ...


@dataclass(eq=False)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    writable: bool
    _map: mmap.mmap
    _start: int  # where the region begins inside the mapping (the offset past a page)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }

    def span(self, offset: int, size: int, where: str) -> tuple[mmap.mmap, int]:
        """(mapping, start) of `size` bytes at `offset` in the region, bounds checked."""
        if offset < 0 or size < 0 or offset + size > self.byte_size:
            raise ShmInvalidError(
                f"{where}: {size} bytes at offset {offset} do not fit in shared-memory region "
                f"{self.name!r} of {self.byte_size} bytes"
            )
        try:
            real = self._map.size()  # the object's size now (fstat)
        except ValueError:  # closed: unregistered while this request held it
            raise ShmNotFoundError(f"{where}: region {self.name!r} was just unregistered") from None
        except OSError as exc:
            raise ShmInvalidError(f"shared-memory region {self.name!r} is unusable: {exc}") from exc
        end = self.offset + offset + size
        if end > real:
            raise ShmInvalidError(
                f"{where}: shared-memory object {self.key!r} shrank to {real} bytes, below the "
                f"{end} that region {self.name!r} needs; register it again"
            )
        return self._map, self._start + offset

    def close(self) -> None:
        # A request still reading it holds a view: the mapping then goes with the view.
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


def _integer(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ShmInvalidError(f"{field} must be a non-negative integer")
    return value


class SharedMemoryRegistry:
    """Owns the registered regions (one lock); the bytes are charged to `headroom`."""

    def __init__(
        self,
        headroom: Headroom,
        max_regions: int,
        max_bytes: int,
        root: Path = SHM_ROOT,
    ) -> None:
        self.headroom = headroom
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.root = root
        # Set by the server at start: TCP callers may register only with a token.
        self.tcp_allowed = False
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        # Derived, not counted beside the regions: at most api.max_shm_regions entries.
        with self._lock:
            return self._registered_bytes()

    def _registered_bytes(self) -> int:
        return sum(r.byte_size for r in self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    # ------------------------------------------------------------- the endpoints

    def register(self, name: str, body: Any, caller: Caller | None) -> None:
        if self.max_regions == 0:
            raise ShmForbiddenError(
                "system shared memory is off on this agent (api.max_shm_regions = 0)"
            )
        caller = self.check_caller(caller)
        _check_name(name)
        if not isinstance(body, dict):
            raise ShmInvalidError('register needs a JSON object {"key", "offset", "byte_size"}')
        key = body.get("key")
        if (
            not isinstance(key, str)
            or not KEY_PATTERN.fullmatch(key)
            or key.strip("/")
            in (
                ".",
                "..",
            )
        ):
            raise ShmInvalidError(
                f"key {str(key)[:80]!r} is not a shared-memory object name (one name under "
                f'{self.root}, like shm_open\'s "/frame0"; never a path)'
            )
        offset = _integer(body.get("offset", 0), "offset")
        size = _integer(body.get("byte_size"), "byte_size")
        if size == 0:
            raise ShmInvalidError("byte_size must be at least 1")
        with self._lock:
            if name in self._regions:
                raise ShmExistsError(
                    f"shared-memory region {name!r} is already registered; unregister it first"
                )
            if len(self._regions) >= self.max_regions:
                raise ShmLimitError(
                    f"{len(self._regions)} shared-memory regions are registered, the most "
                    f"api.max_shm_regions allows; unregister one first"
                )
            registered = self._registered_bytes()
            if registered + size > self.max_bytes:
                raise ShmLimitError(
                    f"region of {size / MB:.2f} MB would take registered shared memory to "
                    f"{(registered + size) / MB:.2f} MB, over api.max_shm_mb = "
                    f"{self.max_bytes / MB:g}"
                )
            region = self._open(name, key, offset, size, caller)
            try:
                self.headroom.pin(size, f"shared-memory region {name!r}")
            except ServingError:
                region.close()
                raise
            self._regions[name] = region

    def unregister(self, name: str | None) -> None:
        """Triton's semantics: an unknown name is not an error (nothing to undo)."""
        with self._lock:
            if name is None:
                gone = list(self._regions.values())
                self._regions.clear()
            else:
                region = self._regions.pop(name, None)
                gone = [] if region is None else [region]
            for region in gone:
                self.headroom.unpin(region.byte_size)
        for region in gone:
            region.close()

    def status(self, name: str | None) -> list[dict[str, Any]]:
        with self._lock:
            if name is None:
                return [r.status() for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise ShmNotFoundError(f"no shared-memory region {name!r} is registered")
        return [region.status()]

    def close(self) -> None:
        self.unregister(None)

    # ------------------------------------------------------------- tensors

    def get(self, name: Any, where: str) -> Region:
        if not isinstance(name, str):
            raise ShmInvalidError(f"{where}.parameters.shared_memory_region must be a string")
        region = self._regions.get(name)  # a dict read: atomic, no lock on the hot path
        if region is None:
            raise ShmNotFoundError(
                f"{where}: no shared-memory region {name[:128]!r} is registered "
                "(POST /v2/systemsharedmemory/region/NAME/register first)"
            )
        return region

    def read(
        self, params: dict[str, Any], where: str, dtype: np.dtype[Any], count: int
    ) -> np.ndarray:
        """The input tensor `params` point at, as a flat array over the mapping (no copy)."""
        region = self.get(params.get("shared_memory_region"), where)
        size = _integer(params.get("shared_memory_byte_size"), f"{where}.shared_memory_byte_size")
        offset = _integer(params.get("shared_memory_offset", 0), f"{where}.shared_memory_offset")
        if size != count * dtype.itemsize:
            raise ShmInvalidError(
                f"{where}: shared_memory_byte_size {size} does not hold its shape "
                f"({count * dtype.itemsize} bytes)"
            )
        mapping, start = region.span(offset, size, where)
        try:
            array = np.frombuffer(mapping, dtype=dtype, count=count, offset=start)
        except ValueError:  # unmapped by an unregister racing this request
            raise ShmNotFoundError(
                f"{where}: region {region.name!r} was just unregistered"
            ) from None
        if not array.flags.aligned:  # an offset not a multiple of the item size
            array = array.copy()
        return array

    def target(self, params: dict[str, Any], where: str) -> tuple[Region, int, int]:
        """(region, offset, byte size) an output is to be written to, checked up front."""
        region = self.get(params.get("shared_memory_region"), where)
        size = _integer(params.get("shared_memory_byte_size"), f"{where}.shared_memory_byte_size")
        offset = _integer(params.get("shared_memory_offset", 0), f"{where}.shared_memory_offset")
        if not region.writable:
            raise ShmForbiddenError(
                f"{where}: shared-memory object {region.key!r} is read-only to the agent"
            )
        region.span(offset, size, where)
        return region, offset, size

    @staticmethod
    def write(
        region: Region, offset: int, size: int, array: np.ndarray, name: str
    ) -> dict[str, Any]:
        """Copy an output into its region; returns the parameters the reply carries."""
        if array.nbytes > size:
            raise ShmInvalidError(
                f"output {name!r} is {array.nbytes} bytes; its shared-memory region "
                f"{region.name!r} offers {size} (shared_memory_byte_size)"
            )
        where = f"output {name!r}"
        mapping, start = region.span(offset, array.nbytes, where)
        try:
            dst = np.frombuffer(mapping, dtype=np.uint8, count=array.nbytes, offset=start)
        except ValueError:  # unmapped by an unregister racing this request
            raise ShmNotFoundError(
                f"{where}: region {region.name!r} was just unregistered"
            ) from None
        dst[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        params: dict[str, Any] = {
            "shared_memory_region": region.name,
            "shared_memory_byte_size": array.nbytes,
        }
        if offset:
            params["shared_memory_offset"] = offset
        return params

    # ------------------------------------------------------------- opening

    def allows(self, caller: Caller | None) -> bool:
        return caller is not None and (not caller.tcp or self.tcp_allowed)

    def check_caller(self, caller: Caller | None) -> Caller:
        if not self.allows(caller):
            raise ShmForbiddenError(_TCP_REFUSED)
        assert caller is not None  # allows() refuses None
        return caller

    def access(self, caller: Caller | None) -> RegionAccess:
        """The registry for a caller who may use it, else an object that refuses."""
        return self if self.allows(caller) else _REFUSED

    def _open(self, name: str, key: str, offset: int, size: int, caller: Caller) -> Region:
        file = key.lstrip("/")
        path = self.root / file
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            writable = True
        except PermissionError:
            fd = -1
        except FileNotFoundError:
            raise ShmNotFoundError(
                f"shared-memory object {key!r} does not exist (no {path}); create it first"
            ) from None
        except OSError as exc:
            raise ShmInvalidError(
                f"cannot open shared-memory object {key!r}: {exc.strerror}"
            ) from exc
        if fd < 0:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                writable = False
            except OSError as exc:
                raise ShmForbiddenError(
                    f"cannot open shared-memory object {key!r}: {exc.strerror}"
                ) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ShmInvalidError(f"{path} is not a shared-memory object (a regular file)")
            # Root on the Unix socket may share anything; a TCP caller (uid unknown)
            # only what the agent's own user owns, even when the agent runs as root.
            owner = os.geteuid() if caller.uid is None else caller.uid
            if caller.uid != 0 and info.st_uid != owner:
                who = "the agent's user" if caller.uid is None else f"uid {caller.uid}"
                raise ShmForbiddenError(
                    f"shared-memory object {key!r} belongs to uid {info.st_uid}, not to {who}"
                )
            if offset + size > info.st_size:
                raise ShmInvalidError(
                    f"region {name!r}: offset {offset} + byte_size {size} = {offset + size} is "
                    f"beyond the end of {key!r} ({info.st_size} bytes)"
                )
            page = mmap.ALLOCATIONGRANULARITY
            base = offset - offset % page
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            mapping = mmap.mmap(fd, offset + size - base, access=access, offset=base)
        except OSError as exc:
            raise ShmInvalidError(f"cannot map shared-memory object {key!r}: {exc}") from exc
        finally:
            os.close(fd)  # the mapping keeps its own descriptor
        return Region(name, key, offset, size, writable, mapping, offset - base)


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ShmInvalidError(
            f"region name {name[:80]!r} must be 1-128 letters, digits, '_', '.' or '-'"
        )
