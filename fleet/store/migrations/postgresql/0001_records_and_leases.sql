-- The append-only record and the driver leases (PostgreSQL).
CREATE TABLE records (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts         DOUBLE PRECISION NOT NULL,
    key_id     TEXT NOT NULL,
    operator   TEXT NOT NULL,
    kind       TEXT NOT NULL,
    rollout_id TEXT,
    device_id  TEXT,
    result     TEXT,
    data       JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX records_rollout ON records (rollout_id, seq);
CREATE INDEX records_device ON records (device_id, seq);
CREATE INDEX records_kind ON records (kind, seq);

-- Append-only: the record is evidence, so nothing may rewrite or remove it.
CREATE FUNCTION records_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'records are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER records_no_update BEFORE UPDATE OR DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION records_append_only();
CREATE TRIGGER records_no_truncate BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION records_append_only();

-- One row per lease name, kept after release so the fencing token only ever grows.
-- holder '' = free.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    token      BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);
