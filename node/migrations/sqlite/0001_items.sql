-- The schema as releases before migrations made it (IF NOT EXISTS: a
-- database from such a release passes through unchanged).
CREATE TABLE IF NOT EXISTS sync_items (
    id BLOB PRIMARY KEY NOT NULL, version INTEGER NOT NULL, origin BLOB NOT NULL,
    updated_at INTEGER NOT NULL, content_type INTEGER NOT NULL, content BLOB NOT NULL,
    content_hash BLOB NOT NULL, state BLOB NOT NULL, tombstone INTEGER NOT NULL,
    access_count INTEGER NOT NULL, last_accessed INTEGER NOT NULL, trace_parent BLOB,
    hkey INTEGER NOT NULL, l2 INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sync_items_state ON sync_items(state, tombstone);
CREATE INDEX IF NOT EXISTS sync_items_hkey ON sync_items(hkey);
CREATE TABLE IF NOT EXISTS sync_purged (
    id BLOB PRIMARY KEY NOT NULL, version INTEGER NOT NULL, origin BLOB NOT NULL,
    purged_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS syncnode_meta (name BLOB PRIMARY KEY NOT NULL, ival INTEGER NOT NULL, bval BLOB);
