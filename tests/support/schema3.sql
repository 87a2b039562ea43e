-- The index schema nwbcache 0.x wrote (schema 3, user_version 3), frozen for the
-- migration tests: a copy, never edited.

CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a stale id names nothing
    name TEXT NOT NULL UNIQUE,             -- the version dir, relative to the layout root
    bytes INTEGER NOT NULL DEFAULT 0,      -- kept by the triggers below
    blocks INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS versions_by_bytes ON versions(bytes);
CREATE TABLE IF NOT EXISTS blocks (
    version INTEGER NOT NULL,              -- versions.id
    idx INTEGER NOT NULL,                  -- block index within the object
    bytes INTEGER NOT NULL,                -- file size on disk
    atime REAL NOT NULL,                   -- last use, seconds since the epoch (LRU)
    queue INTEGER NOT NULL DEFAULT 0,      -- S3-FIFO: 0 small, 1 main (policy.Queue)
    freq INTEGER NOT NULL DEFAULT 0,       -- S3-FIFO: hits, 0 to 3
    seq INTEGER NOT NULL DEFAULT 0,        -- S3-FIFO: order of entry into its queue
    PRIMARY KEY (version, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_by_atime ON blocks(atime);
CREATE INDEX IF NOT EXISTS blocks_by_queue ON blocks(queue, seq);
-- S3-FIFO's ghost list: blocks evicted from the small queue, by policy.ghost_key.
CREATE TABLE IF NOT EXISTS ghosts (key INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS ghosts_by_seq ON ghosts(seq);
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    blocks INTEGER NOT NULL,
    small_bytes INTEGER NOT NULL DEFAULT 0,  -- in the small queue
    small_blocks INTEGER NOT NULL DEFAULT 0,
    ghosts INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0           -- the last queue position handed out
);
INSERT OR IGNORE INTO totals(id, bytes, blocks) VALUES (0, 0, 0);
-- Work in progress that must survive a crash: the reconciler's cursor.
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Totals kept by triggers: the cache's size, a version's and a queue's are
-- O(1) reads. A version's row goes with its last block, so the table lists
-- what is cached.
CREATE TRIGGER IF NOT EXISTS blocks_ins AFTER INSERT ON blocks BEGIN
    UPDATE totals SET bytes = bytes + NEW.bytes, blocks = blocks + 1,
        small_bytes = small_bytes + NEW.bytes * (NEW.queue = 0),
        small_blocks = small_blocks + (NEW.queue = 0) WHERE id = 0;
    UPDATE versions SET bytes = bytes + NEW.bytes, blocks = blocks + 1 WHERE id = NEW.version;
END;
CREATE TRIGGER IF NOT EXISTS blocks_del AFTER DELETE ON blocks BEGIN
    UPDATE totals SET bytes = bytes - OLD.bytes, blocks = blocks - 1,
        small_bytes = small_bytes - OLD.bytes * (OLD.queue = 0),
        small_blocks = small_blocks - (OLD.queue = 0) WHERE id = 0;
    UPDATE versions SET bytes = bytes - OLD.bytes, blocks = blocks - 1 WHERE id = OLD.version;
    DELETE FROM versions WHERE id = OLD.version AND blocks <= 0;
END;
CREATE TRIGGER IF NOT EXISTS blocks_queue AFTER UPDATE OF queue ON blocks
WHEN OLD.queue != NEW.queue BEGIN
    UPDATE totals SET
        small_bytes = small_bytes + NEW.bytes * (NEW.queue = 0) - OLD.bytes * (OLD.queue = 0),
        small_blocks = small_blocks + (NEW.queue = 0) - (OLD.queue = 0) WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS ghosts_ins AFTER INSERT ON ghosts BEGIN
    UPDATE totals SET ghosts = ghosts + 1 WHERE id = 0;
END;
CREATE TRIGGER IF NOT EXISTS ghosts_del AFTER DELETE ON ghosts BEGIN
    UPDATE totals SET ghosts = ghosts - 1 WHERE id = 0;
END;

