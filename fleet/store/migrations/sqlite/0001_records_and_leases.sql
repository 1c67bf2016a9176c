-- The append-only record and the driver leases (SQLite).
-- seq: AUTOINCREMENT so a number is never reused, even after the newest row is lost.
CREATE TABLE records (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts         REAL    NOT NULL,
    key_id     TEXT    NOT NULL,
    operator   TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    rollout_id TEXT,
    device_id  TEXT,
    result     TEXT,
    data       TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX records_rollout ON records (rollout_id, seq);
CREATE INDEX records_device ON records (device_id, seq);
CREATE INDEX records_kind ON records (kind, seq);

-- Append-only: the record is evidence, so nothing may rewrite or remove it.
CREATE TRIGGER records_no_update BEFORE UPDATE ON records
BEGIN
    SELECT RAISE(ABORT, 'records are append-only: UPDATE refused');
END;
CREATE TRIGGER records_no_delete BEFORE DELETE ON records
BEGIN
    SELECT RAISE(ABORT, 'records are append-only: DELETE refused');
END;

-- One row per lease name, kept after release so the fencing token only ever grows.
-- holder '' = free.
CREATE TABLE leases (
    name       TEXT    PRIMARY KEY,
    holder     TEXT    NOT NULL,
    token      INTEGER NOT NULL,
    expires_at REAL    NOT NULL
);
