"""MQTT chunk transfers of a signed bundle: the `Fetcher` for `transfer` deploys.

The console (fleet/transfer.py `ChunkSender`) publishes chunks on
`…/bundle/{transfer_id}` (format: agent/protocol/transfer.py). This side keeps a
bitmap of the chunks it has, persisted beside the partial file (`.part.bitmap`), and
writes each chunk at its offset. It asks for what it lacks (a "need" message) at
start, after `update.chunk_timeout_s` without a new chunk, after every reconnect,
and as soon as the last chunk of a round arrived with gaps before it, so a transfer survives drops, broker restarts and agent restarts (a new
fetch resumes from the bitmap). A chunk that fails its own checks, names another
bundle, or does not fit the layout seen first is dropped and counted, never
written; the whole file's sha256 is checked at the end. After
`update.transfer_timeout_s` it gives up: `update.transfer_failed` with the figures.

Chunks arrive on the MQTT network thread; `on_chunk` only queues them (bounded:
when full they are dropped, counted, and asked for again), and the fetch thread
does the checking and writing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.atomicfile import write_atomic
from agent.config.model import UpdateConfig
from agent.protocol.transfer import (
    HEADER_BYTES,
    MAX_CHUNK,
    Chunk,
    Need,
    NeedReason,
    TransferError,
    chunk_count,
    decode_chunk,
    ranges_of,
)
from agent.protocol.update import DeployRequest, MqttSource
from agent.update.errors import UpdateCode, UpdateError
from agent.update.fetch.partial import PartialFile, hash_file
from agent.update.ports import ChunkTransport, Progress

log = logging.getLogger(__name__)

# Chunks waiting to be written; beyond: dropped and asked again. Each is at most
# HEADER_BYTES + MAX_CHUNK (bigger ones are dropped on arrival): <= 16 MiB queued.
QUEUE_CHUNKS = 256
BITMAP_SAVE_S = 1.0  # how often the bitmap is written (after an fsync of the data)
PROGRESS_EVERY_S = 0.25
_BITMAP = struct.Struct(">4sIIQ32s")
_BITMAP_MAGIC = b"ERB1"
_RECONNECTED = object()


@dataclass(frozen=True)
class MqttSettings:
    chunk_timeout_s: float = 5.0
    transfer_timeout_s: float = 600.0

    @classmethod
    def from_config(cls, config: UpdateConfig) -> MqttSettings:
        return cls(config.chunk_timeout_s, config.transfer_timeout_s)


class Bitmap:
    """Which chunks are on disk; saved atomically beside the partial file."""

    def __init__(self, total: int, chunk_size: int) -> None:
        self.total, self.chunk_size = total, chunk_size
        self.bits = bytearray((total + 7) // 8)
        self.count = 0

    def has(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> None:
        if not self.has(i):
            self.bits[i >> 3] |= 1 << (i & 7)
            self.count += 1

    @property
    def complete(self) -> bool:
        return self.count == self.total

    def missing(self) -> list[int]:
        return [i for i in range(self.total) if not self.has(i)]

    def save(self, path: Path, size: int, sha256: str) -> None:
        """Replace the saved bitmap; the caller has fsynced every chunk it names.

        No fsync of this file or its directory, deliberately: it is rewritten every
        BITMAP_SAVE_S while chunks arrive, and every bit it sets names a chunk whose
        bytes were fsynced before this write began (`_Run.save`: `part.sync()` first;
        a chunk is written before its bit is set, and the partial file's bytes are only
        ever overwritten with the same chunk). So whatever a power cut leaves under the
        name is safe: the old bitmap (fewer chunks, each fsynced before it was
        written), the new one, or an empty or short file (`load` says None: the
        download starts clean). Losing the latest save only downloads those chunks
        again, and the sha256 of the whole file is checked before it is used.
        """
        head = _BITMAP.pack(_BITMAP_MAGIC, self.total, self.chunk_size, size, bytes.fromhex(sha256))
        # 0o666 under the umask: what the plain write_bytes it replaced gave.
        write_atomic(path, head + bytes(self.bits), mode=0o666, fsync=False, fsync_dir=False)

    @classmethod
    def load(cls, path: Path, size: int, sha256: str) -> Bitmap | None:
        """The saved bitmap, or None when missing, damaged or for another bundle."""
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        if len(raw) < _BITMAP.size:
            return None
        magic, total, chunk_size, got_size, sha = _BITMAP.unpack_from(raw)
        if magic != _BITMAP_MAGIC or got_size != size or sha.hex() != sha256:
            return None
        if chunk_size < 1 or total != chunk_count(size, chunk_size):
            return None
        if len(raw) != _BITMAP.size + (total + 7) // 8:
            return None
        bitmap = cls(total, chunk_size)
        bitmap.bits[:] = raw[_BITMAP.size :]
        if total % 8:
            bitmap.bits[-1] &= (1 << (total % 8)) - 1  # no bits past the last chunk
        bitmap.count = sum(bin(b).count("1") for b in bitmap.bits)
        return bitmap


class MqttFetcher:
    """The `Fetcher` for `transfer` deploys, over a `ChunkTransport` (the MQTT link)."""

    def __init__(
        self,
        transport: ChunkTransport,
        settings: MqttSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.settings = settings or MqttSettings()
        self._clock = clock
        # Figures of the last fetch (events, tests, the benchmark).
        self.dropped: Counter[str] = Counter()
        self.needs_sent: Counter[str] = Counter()
        self.duplicates = 0
        self.resumed_chunks = 0

    def fetch(
        self, request: DeployRequest, partial: Path, progress: Progress, cancel: threading.Event
    ) -> Path:
        if not isinstance(request.source, MqttSource):
            raise UpdateError(UpdateCode.INTERNAL, "MqttFetcher got a deploy without a transfer")
        tid = request.source.transfer_id
        part = PartialFile(partial, request.size, request.sha256)
        done = part.done_already()
        if done is not None:
            progress(request.size, request.size)
            return done
        self.dropped, self.needs_sent = Counter(), Counter()
        self.duplicates = 0
        bitmap = Bitmap.load(part.bitmap_path, request.size, request.sha256)
        if bitmap is None or part.length() == 0:
            part.remove()  # bytes without a bitmap are not known good: start clean
            bitmap = None
        self.resumed_chunks = bitmap.count if bitmap else 0
        inbox: queue.Queue[object] = queue.Queue(QUEUE_CHUNKS)

        def on_chunk(data: bytes) -> None:  # network thread: queue and return
            if len(data) > HEADER_BYTES + MAX_CHUNK:
                self.dropped["length"] += 1
                return
            try:
                inbox.put_nowait(data)
            except queue.Full:
                self.dropped["queue_full"] += 1

        def on_reconnect() -> None:
            with contextlib.suppress(queue.Full):
                inbox.put_nowait(_RECONNECTED)

        run = _Run(self, request, tid, part, bitmap, progress)
        self.transport.subscribe_chunks(tid, on_chunk, on_reconnect)
        try:
            return run.until_complete(inbox, cancel)
        finally:
            self.transport.unsubscribe_chunks(tid)
            part.close()


class _Run:
    """One fetch's loop; owns the bitmap and the partial file while it runs."""

    def __init__(
        self,
        fetcher: MqttFetcher,
        request: DeployRequest,
        tid: str,
        part: PartialFile,
        bitmap: Bitmap | None,
        progress: Progress,
    ) -> None:
        self.f, self.request, self.tid, self.part = fetcher, request, tid, part
        self.bitmap = bitmap
        self.progress = progress
        self.clock = fetcher._clock
        self.dirty = False
        self.saved_at = self.clock()
        self.reported_at = float("-inf")
        # The last index the latest need asked for (None: everything, so total - 1).
        self.round_last: int | None = None
        self.round_ended = False

    def until_complete(self, inbox: queue.Queue[object], cancel: threading.Event) -> Path:
        s = self.f.settings
        start = self.clock()
        self.ask("start")
        last_news = self.clock()
        self.report(force=True)
        while self.bitmap is None or not self.bitmap.complete:
            if cancel.is_set():
                self.save()
                raise UpdateError(
                    UpdateCode.CANCELLED,
                    f"transfer {self.tid} cancelled with {self.have()} (kept for a resume)",
                    **self.figures(),
                )
            now = self.clock()
            if now - start >= s.transfer_timeout_s:
                self.save()
                raise UpdateError(
                    UpdateCode.TRANSFER_FAILED,
                    f"transfer {self.tid}: gave up after {s.transfer_timeout_s:g} s "
                    f"(update.transfer_timeout_s) with {self.have()}; "
                    f"dropped chunks: {dict(self.f.dropped) or 'none'}; is the console's "
                    "sender answering on …/bundle/{transfer_id}/need?",
                    **self.figures(),
                )
            try:
                item = inbox.get(timeout=min(0.2, s.chunk_timeout_s))
            except queue.Empty:
                if self.clock() - last_news >= s.chunk_timeout_s:
                    self.ask("silence")
                    last_news = self.clock()
                self.maybe_save()
                continue
            if item is _RECONNECTED:
                self.ask("reconnect")
                last_news = self.clock()
                continue
            assert isinstance(item, bytes)
            if self.take(item):
                last_news = self.clock()
                if self.round_ended and self.bitmap is not None and not self.bitmap.complete:
                    self.ask("gap")  # the sender is done with the last need: ask now, not later
            self.maybe_save()
            self.report()
        self.save()
        self.report(force=True)
        self.part.close()
        try:
            digest, _ = hash_file(self.part.path)
        except OSError as exc:
            raise UpdateError(
                UpdateCode.TRANSFER_FAILED, f"cannot read {self.part.path}: {exc}"
            ) from exc
        return self.part.finish(digest.hexdigest(), f"transfer {self.tid}")

    # ----------------------------------------------------------------- chunks

    def take(self, data: bytes) -> bool:
        """Check and write one chunk; True when it was new."""
        try:
            chunk = decode_chunk(data)
        except TransferError as exc:
            self.drop(exc.reason, exc.message)
            return False
        if chunk.bundle_sha256 != self.request.sha256 or chunk.bundle_size != self.request.size:
            self.drop("other_bundle", f"chunk for bundle {chunk.bundle_sha256[:12]}…")
            return False
        if self.bitmap is None:
            self.bitmap = Bitmap(chunk.total, chunk.chunk_size)
        elif (chunk.total, chunk.chunk_size) != (self.bitmap.total, self.bitmap.chunk_size):
            self.drop(
                "layout",
                f"chunk {chunk.index} in {chunk.chunk_size}-byte chunks; this transfer uses "
                f"{self.bitmap.chunk_size}",
            )
            return False
        if self.bitmap.has(chunk.index):
            self.f.duplicates += 1
            return False
        self.write(chunk)
        return True

    def write(self, chunk: Chunk) -> None:
        assert self.bitmap is not None
        self.part.write_at(chunk.offset, chunk.payload)
        self.bitmap.set(chunk.index)
        self.dirty = True
        last = self.round_last if self.round_last is not None else self.bitmap.total - 1
        self.round_ended = chunk.index == last

    def drop(self, reason: str, message: str) -> None:
        self.f.dropped[reason] += 1
        log.debug("transfer %s: dropped a chunk (%s): %s", self.tid, reason, message)

    # ----------------------------------------------------------------- asking

    def ask(self, reason: NeedReason) -> None:
        bitmap = self.bitmap
        need = Need(
            self.tid,
            self.request.sha256,
            self.request.size,
            None if bitmap is None else bitmap.total,
            () if bitmap is None else ranges_of(bitmap.missing()),
            reason,
        )
        self.round_last = need.missing[-1][1] - 1 if need.missing else None
        self.round_ended = False
        try:
            self.f.transport.request_chunks(self.tid, need.encode())
            self.f.needs_sent[reason] += 1
        except Exception as exc:  # not connected: the next silence or reconnect asks again
            log.debug("transfer %s: need not sent (%s): %s", self.tid, reason, exc)

    # ----------------------------------------------------------------- state

    def maybe_save(self) -> None:
        if self.dirty and self.clock() - self.saved_at >= BITMAP_SAVE_S:
            self.save()

    def save(self) -> None:
        """Data first (fsync), then the bitmap that says it is there."""
        if not self.dirty or self.bitmap is None:
            return
        self.part.sync()
        try:
            self.bitmap.save(self.part.bitmap_path, self.request.size, self.request.sha256)
        except OSError as exc:
            raise self.part.io_error("cannot write", exc, self.part.bitmap_path) from exc
        self.dirty = False
        self.saved_at = self.clock()

    def have(self) -> str:
        if self.bitmap is None:
            return "no chunk yet"
        return f"{self.bitmap.count} of {self.bitmap.total} chunks"

    def figures(self) -> dict[str, object]:
        b = self.bitmap
        return {
            "chunks": 0 if b is None else b.count,
            "total": 0 if b is None else b.total,
            "dropped": sum(self.f.dropped.values()),
        }

    def report(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.reported_at < PROGRESS_EVERY_S:
            return
        self.reported_at = now
        b = self.bitmap
        done = 0 if b is None else min(self.request.size, b.count * b.chunk_size)
        if b is not None and b.complete:
            done = self.request.size
        try:
            self.progress(done, self.request.size)
        except Exception:
            log.exception("progress callback failed")


__all__ = ["Bitmap", "MqttFetcher", "MqttSettings"]
