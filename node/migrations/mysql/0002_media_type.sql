-- The media type its writer gave (HTTP Content-Type); NULL: none.
ALTER TABLE sync_items ADD COLUMN media_type VARBINARY(255) NULL;
