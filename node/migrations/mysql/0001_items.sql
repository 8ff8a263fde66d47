-- The schema as releases before migrations made it (IF NOT EXISTS: a
-- database from such a release passes through unchanged).
CREATE TABLE IF NOT EXISTS sync_items (
    id VARBINARY(512) NOT NULL PRIMARY KEY, version BIGINT NOT NULL, origin VARBINARY(128) NOT NULL,
    updated_at BIGINT NOT NULL, content_type BIGINT NOT NULL, content LONGBLOB NOT NULL,
    content_hash BINARY(32) NOT NULL, state VARBINARY(64) NOT NULL, tombstone BIGINT NOT NULL,
    access_count BIGINT NOT NULL, last_accessed BIGINT NOT NULL, trace_parent VARBINARY(256) NULL,
    hkey BIGINT NOT NULL, l2 BIGINT NOT NULL,
    KEY sync_items_state (state, tombstone), KEY sync_items_hkey (hkey)) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS sync_purged (
    id VARBINARY(512) NOT NULL PRIMARY KEY, version BIGINT NOT NULL, origin VARBINARY(128) NOT NULL,
    purged_at BIGINT NOT NULL) ENGINE=InnoDB;
CREATE TABLE IF NOT EXISTS syncnode_meta (
    name VARBINARY(64) NOT NULL PRIMARY KEY, ival BIGINT NOT NULL, bval LONGBLOB NULL) ENGINE=InnoDB;
