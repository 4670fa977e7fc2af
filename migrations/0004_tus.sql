-- tus 1.0 uploads (issue 10): the protocol state of an upload made through /api/v1/tus/.
--
-- A plain or final tus upload IS an upload session (session_id = id): its document,
-- job, S3 multipart upload, expiry and status live in upload_sessions as for any
-- other upload.  This table adds what tus needs beside it: the committed
-- Upload-Offset, the length (NULL while deferred; the session is then sized for the
-- largest allowed file until the client declares it), the raw Upload-Metadata that
-- HEAD echoes, and where the incomplete part's segments start (objects
-- tus/<id>/pending/<start> in S3).  A partial upload (Upload-Concat: partial) never
-- becomes a document, so it has no session: its own S3 multipart upload, object key
-- and expiry are kept here instead.

CREATE TABLE tus_uploads (
    id                 uuid PRIMARY KEY,
    owner_id           text NOT NULL,
    session_id         uuid UNIQUE REFERENCES upload_sessions (id) ON DELETE CASCADE,
    concat             text NOT NULL DEFAULT 'none' CHECK (concat IN ('none', 'partial', 'final')),
    concat_header      text NOT NULL DEFAULT '',   -- a final upload's Upload-Concat, echoed by HEAD
    upload_length      bigint CHECK (upload_length >= 0),
    upload_offset      bigint NOT NULL DEFAULT 0 CHECK (upload_offset >= 0),
    chunk_size         bigint NOT NULL CHECK (chunk_size > 0),
    pending_starts     bigint[] NOT NULL DEFAULT '{}',
    metadata           text NOT NULL DEFAULT '',
    object_key         text,                       -- partial uploads only
    s3_upload_id       text,                       -- partial uploads only; NULL once completed
    expires_at         timestamptz,                -- partial uploads only
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (upload_length IS NULL OR upload_offset <= upload_length),
    CHECK ((concat = 'partial') = (session_id IS NULL)),
    CHECK (session_id IS NOT NULL OR (object_key IS NOT NULL AND expires_at IS NOT NULL))
);
CREATE INDEX tus_uploads_partial_expiry ON tus_uploads (expires_at) WHERE session_id IS NULL;
CREATE INDEX tus_uploads_pending ON tus_uploads (session_id) WHERE pending_starts <> '{}';
