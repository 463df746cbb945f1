"""The ledger's schema as an ordered list of migrations.

``MIGRATIONS[i]`` brings a database from ``PRAGMA user_version = i`` to ``i + 1``. Each is applied in
its own transaction together with the version bump, so a crash mid-upgrade leaves the previous
version intact. Never edit a released migration; append a new one.

Timestamps are host epoch seconds (REAL). Structured payloads are JSON text.
"""

from __future__ import annotations

_V1 = """
CREATE TABLE campaigns (
    id            INTEGER PRIMARY KEY,
    plan_name     TEXT NOT NULL,
    plan          TEXT NOT NULL,          -- JSON
    config_digest TEXT NOT NULL,
    simulated     INTEGER NOT NULL,
    provenance    TEXT NOT NULL,          -- JSON
    started_at    REAL NOT NULL,
    finished_at   REAL,
    exit_status   TEXT
);

CREATE TABLE configurations (
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    config_id   TEXT NOT NULL,
    ord         INTEGER NOT NULL,
    experts     INTEGER,
    target      TEXT,
    data        TEXT NOT NULL,            -- JSON
    PRIMARY KEY (campaign_id, config_id)
) WITHOUT ROWID;

CREATE TABLE trials (
    id          INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
    config_id   TEXT NOT NULL,
    rep         INTEGER NOT NULL,
    status      TEXT NOT NULL DEFAULT 'pending',
    valid       INTEGER,                  -- NULL until judged
    reasons     TEXT NOT NULL DEFAULT '[]',
    updated_at  REAL NOT NULL,
    UNIQUE (campaign_id, config_id, rep),
    FOREIGN KEY (campaign_id, config_id) REFERENCES configurations(campaign_id, config_id)
);

CREATE TABLE checkpoints (
    id       INTEGER PRIMARY KEY,
    trial_id INTEGER NOT NULL REFERENCES trials(id),
    stage    TEXT NOT NULL,
    status   TEXT NOT NULL CHECK (status IN ('started', 'done', 'failed', 'discarded')),
    data     TEXT,                        -- JSON
    t        REAL NOT NULL
);
CREATE INDEX checkpoints_trial ON checkpoints(trial_id, stage, id);

CREATE TABLE markers (
    id       INTEGER PRIMARY KEY,
    trial_id INTEGER NOT NULL REFERENCES trials(id),
    kind     TEXT NOT NULL CHECK (kind IN ('begin', 'end')),
    t        REAL NOT NULL
);
CREATE INDEX markers_trial ON markers(trial_id, id);

CREATE TABLE benchmark_results (
    trial_id INTEGER PRIMARY KEY REFERENCES trials(id),
    result   TEXT NOT NULL,               -- JSON
    t        REAL NOT NULL
);

CREATE TABLE epi_results (
    trial_id INTEGER PRIMARY KEY REFERENCES trials(id),
    result   TEXT NOT NULL,               -- JSON
    t        REAL NOT NULL
);

-- Chunks of packed ticks (see samples.py), in commit order. The newest chunk is the open one: small
-- commits append to it in place until it holds a page's worth. t_first/t_last are the min/max tick
-- time; a chunk never spans more than MAX_CHUNK_SPAN_S, which lets a time query use the t_first
-- index alone.
CREATE TABLE sample_chunks (
    id      INTEGER PRIMARY KEY,
    t_first REAL NOT NULL,
    t_last  REAL NOT NULL,
    n       INTEGER NOT NULL,
    nch     INTEGER NOT NULL,
    data    BLOB NOT NULL
);
CREATE INDEX sample_chunks_t ON sample_chunks(t_first);

CREATE TABLE gaps (
    id      INTEGER PRIMARY KEY,
    t0      REAL NOT NULL,
    t1      REAL NOT NULL,
    cause   TEXT NOT NULL,
    channel INTEGER,                      -- NULL: all channels
    data    TEXT                          -- JSON
);
CREATE INDEX gaps_t ON gaps(t0);

CREATE TABLE events (
    id       INTEGER PRIMARY KEY,
    t        REAL NOT NULL,
    kind     TEXT NOT NULL,
    level    TEXT NOT NULL,
    message  TEXT NOT NULL,
    data     TEXT,                        -- JSON
    trial_id INTEGER
);

CREATE TABLE commands (
    id      INTEGER PRIMARY KEY,
    t       REAL NOT NULL,
    verb    TEXT NOT NULL,
    args    TEXT NOT NULL,                -- JSON
    status  TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    result  TEXT,                         -- JSON
    t_done  REAL
);
CREATE INDEX commands_pending ON commands(status, id);

CREATE TABLE provenance (
    scope    TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    data     TEXT NOT NULL,               -- JSON
    t        REAL NOT NULL,
    PRIMARY KEY (scope, scope_id)
) WITHOUT ROWID;

CREATE TABLE live (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL,                  -- JSON
    t     REAL NOT NULL
) WITHOUT ROWID;
"""

#: Ordered migrations; the schema version is ``len(MIGRATIONS)``.
MIGRATIONS: tuple[str, ...] = (_V1,)
SCHEMA_VERSION = len(MIGRATIONS)
