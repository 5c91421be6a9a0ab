"""The registry's SQLite schema (its version is checked when the database is opened)."""

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    tier        TEXT NOT NULL,
    env         TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'active', 'revoked')),
    key_source  TEXT NOT NULL CHECK (key_source IN ('generated', 'csr')),
    serial      TEXT NOT NULL,
    batch_id    TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS devices_batch ON devices(batch_id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS certificates (
    serial            TEXT PRIMARY KEY,
    device_id         TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    key_type          TEXT NOT NULL,
    not_before        TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    status            TEXT NOT NULL
                      CHECK (status IN ('pending', 'active', 'superseded', 'revoked')),
    issued_at         TEXT NOT NULL,
    revoked_at        TEXT,
    revocation_reason TEXT
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id);
CREATE INDEX IF NOT EXISTS certificates_revoked ON certificates(status) WHERE status = 'revoked';
CREATE TABLE IF NOT EXISTS claims (
    name              TEXT PRIMARY KEY,
    serial            TEXT NOT NULL UNIQUE,
    tier              TEXT NOT NULL,
    env               TEXT NOT NULL,
    allow_ids         TEXT NOT NULL,
    max_uses          INTEGER NOT NULL CHECK (max_uses > 0),
    uses              INTEGER NOT NULL DEFAULT 0 CHECK (uses <= max_uses),
    device_valid_for  REAL NOT NULL,
    not_after         TEXT NOT NULL,
    created_at        TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at        TEXT,
    revocation_reason TEXT
);
CREATE TABLE IF NOT EXISTS enrollments (
    device_id       TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    claim           TEXT NOT NULL REFERENCES claims(name),
    hardware_serial TEXT NOT NULL,
    request_id      TEXT NOT NULL,
    enrolled_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS renewal_requests (
    request_id  TEXT PRIMARY KEY,
    device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    serial      TEXT NOT NULL,
    answered_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issuer_revocations (
    serial            TEXT PRIMARY KEY,
    subject           TEXT NOT NULL,
    revoked_at        TEXT NOT NULL,
    revocation_reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS admins (
    serial            TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    issued_at         TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at        TEXT,
    revocation_reason TEXT
);
"""
