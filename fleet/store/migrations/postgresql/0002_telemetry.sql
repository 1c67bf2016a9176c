-- Recent telemetry per device for the dashboard: bounded, pruned by age (not append-only).
CREATE TABLE telemetry (
    device_id     TEXT NOT NULL,
    ts            DOUBLE PRECISION NOT NULL,
    p95_ms        DOUBLE PRECISION,
    rate_per_s    DOUBLE PRECISION,
    error_rate    DOUBLE PRECISION,
    rss_mb        DOUBLE PRECISION,
    temperature_c DOUBLE PRECISION
);
CREATE INDEX telemetry_device ON telemetry (device_id, ts);
CREATE INDEX telemetry_ts ON telemetry (ts);
