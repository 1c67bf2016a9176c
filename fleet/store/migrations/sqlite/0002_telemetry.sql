-- Recent telemetry per device for the dashboard: bounded, pruned by age (not append-only).
CREATE TABLE telemetry (
    device_id     TEXT NOT NULL,
    ts            REAL NOT NULL,
    p95_ms        REAL,
    rate_per_s    REAL,
    error_rate    REAL,
    rss_mb        REAL,
    temperature_c REAL
);
CREATE INDEX telemetry_device ON telemetry (device_id, ts);
CREATE INDEX telemetry_ts ON telemetry (ts);
