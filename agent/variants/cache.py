"""The variant choice remembered in the state directory, so a restart does not measure again.

One JSON file, `STATE/variant-choice.json`, written whole to a temporary file and
renamed over the old one. An entry is keyed by the sha256 of its key document:
the bundle's sha256, the runtimes' identities (version, config, providers), the
hardware fingerprint and the probe batch. Anything else in the file (a corrupt or
truncated file, a key that does not match, a wrong type) is a miss: the variants
are measured again. Only the newest MAX_ENTRIES entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from agent import strictjson
from agent.atomicfile import remove_stale_temps, write_atomic

log = logging.getLogger(__name__)

SCHEMA = "edgerun.variant-choice/1"
FILENAME = "variant-choice.json"
MAX_ENTRIES = 8
_MAX_BYTES = 1 << 20


def cache_key(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


class ChoiceCache:
    """Owner of STATE/variant-choice.json."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILENAME
        # Built once at start, under the state lock: no write of ours is in flight, so
        # a temporary file here is a crash's leftover.
        remove_stale_temps(self.path)

    def _entries(self) -> dict[str, Any]:
        try:
            with self.path.open("rb") as fh:
                data = fh.read(_MAX_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s (%s); variants are measured again", self.path, exc)
            return {}
        try:
            if len(data) > _MAX_BYTES:
                raise strictjson.JsonRefusedError(f"over {_MAX_BYTES} bytes")
            doc = strictjson.loads(data, FILENAME)
        except strictjson.JsonRefusedError as exc:
            log.warning("%s is corrupt (%s); variants are measured again", self.path, exc)
            return {}
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if (
            not isinstance(doc, dict)
            or doc.get("schema") != SCHEMA
            or not isinstance(entries, dict)
        ):
            log.warning("%s is not a %s file; variants are measured again", self.path, SCHEMA)
            return {}
        return entries

    def get(self, key: str) -> dict[str, Any] | None:
        """The record stored under `key`, or None (absent, corrupt, malformed)."""
        record = self._entries().get(key)
        if not isinstance(record, dict) or not isinstance(record.get("chosen"), str):
            return None
        if not isinstance(record.get("results"), list):
            return None
        batch = record.get("batch", 0)
        if not isinstance(batch, int) or isinstance(batch, bool):
            return None
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        entries = self._entries()
        entries.pop(key, None)
        entries[key] = record
        self._write(dict(list(entries.items())[-MAX_ENTRIES:]))

    def forget(self, key: str) -> None:
        entries = self._entries()
        if entries.pop(key, None) is not None:
            self._write(entries)

    def _write(self, entries: dict[str, Any]) -> None:
        """The one writer: a temporary file in the same folder, fsync, renamed over the
        old one, so a crash mid-write leaves the old file or the new, never a torn one."""
        body = json.dumps({"schema": SCHEMA, "entries": entries}, indent=1)
        try:
            # 0o600: what the tempfile.mkstemp it replaced gave.
            write_atomic(self.path, (body + "\n").encode(), mode=0o600)
        except OSError as exc:  # a full disk costs a measurement at the next start, no more
            log.warning(
                "cannot write %s (%s); the cached choices stay as they were", self.path, exc
            )


__all__ = ["FILENAME", "ChoiceCache", "cache_key"]
