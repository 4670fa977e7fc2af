-- Sluice's base schema: documents, jobs, upload sessions and their parts, chunks.
-- Every row that a client can see carries owner_id (the JWT subject).

CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE documents (
    id                 uuid PRIMARY KEY,
    owner_id           text NOT NULL,
    filename           text NOT NULL,             -- as given by the client, display only
    content_type       text NOT NULL,
    document_type      text NOT NULL CHECK (document_type IN ('pdf', 'txt', 'md', 'csv', 'json', 'html')),
    size_bytes         bigint NOT NULL CHECK (size_bytes >= 0),
    checksum_sha256    text,                      -- declared by the client, verified by validate
    sha256             text,                      -- computed by validate
    object_key         text NOT NULL UNIQUE,      -- never derived from the filename
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'stored', 'processing', 'indexed', 'failed', 'cancelled')),
    processing_options jsonb NOT NULL DEFAULT '{}',
    page_count         integer,
    deduplicated_of    uuid REFERENCES documents (id) ON DELETE SET NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX documents_owner_created ON documents (owner_id, created_at DESC, id);
CREATE INDEX documents_owner_sha256 ON documents (owner_id, sha256) WHERE status = 'indexed';

CREATE TABLE jobs (
    id                 uuid PRIMARY KEY,
    owner_id           text NOT NULL,
    document_id        uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    priority           text NOT NULL DEFAULT 'normal' CHECK (priority IN ('low', 'normal', 'high', 'critical')),
    status             text NOT NULL
                       CHECK (status IN ('awaiting_upload', 'queued', 'running', 'retrying',
                                         'completed', 'failed', 'cancelled')),
    stage              text CHECK (stage IN ('upload', 'validate', 'extract', 'chunk', 'embed', 'index')),
    stage_progress     real NOT NULL DEFAULT 0,
    overall_progress   real NOT NULL DEFAULT 0,
    message            text NOT NULL DEFAULT '',
    seq                bigint NOT NULL DEFAULT 0,   -- grows with every published state change
    attempts           integer NOT NULL DEFAULT 0,
    error_code         text,
    error_message      text,
    warnings           jsonb NOT NULL DEFAULT '[]',
    stage_timings      jsonb NOT NULL DEFAULT '{}', -- stage -> seconds
    result             jsonb NOT NULL DEFAULT '{}',
    cancel_requested   boolean NOT NULL DEFAULT false,
    lease_owner        text,                        -- worker holding the running job
    lease_expires_at   timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    queued_at          timestamptz,
    started_at         timestamptz,
    finished_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_owner_created ON jobs (owner_id, created_at DESC, id);
CREATE INDEX jobs_document ON jobs (document_id);
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';

CREATE TABLE upload_sessions (
    id                 uuid PRIMARY KEY,
    owner_id           text NOT NULL,
    document_id        uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    job_id             uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    s3_upload_id       text NOT NULL,
    object_key         text NOT NULL,
    filename           text NOT NULL,
    file_size          bigint NOT NULL CHECK (file_size >= 0),
    content_type       text NOT NULL,
    chunk_size         bigint NOT NULL CHECK (chunk_size > 0),
    total_parts        integer NOT NULL CHECK (total_parts BETWEEN 1 AND 10000),
    status             text NOT NULL DEFAULT 'initiated'
                       CHECK (status IN ('initiated', 'uploading', 'completing', 'completed',
                                         'cancelled', 'expired')),
    expires_at         timestamptz NOT NULL,
    completed_at       timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX upload_sessions_owner_active ON upload_sessions (owner_id, created_at DESC, id)
    WHERE status IN ('initiated', 'uploading');
CREATE INDEX upload_sessions_expiry ON upload_sessions (expires_at)
    WHERE status IN ('initiated', 'uploading');

CREATE TABLE upload_parts (
    upload_id          uuid NOT NULL REFERENCES upload_sessions (id) ON DELETE CASCADE,
    part_number        integer NOT NULL CHECK (part_number BETWEEN 1 AND 10000),
    size               bigint NOT NULL CHECK (size >= 0),
    etag               text NOT NULL,
    md5                text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (upload_id, part_number)
);

CREATE TABLE chunks (
    document_id        uuid NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    seq                integer NOT NULL,
    owner_id           text NOT NULL,               -- denormalised for search filtering
    text               text NOT NULL,
    token_count        integer NOT NULL,
    page_start         integer,
    page_end           integer,
    char_start         integer NOT NULL,
    char_end           integer NOT NULL,
    sha256             text NOT NULL,
    embedding          vector(384) NOT NULL,
    PRIMARY KEY (document_id, seq)
);
CREATE INDEX chunks_embedding_hnsw ON chunks USING hnsw (embedding vector_cosine_ops);
CREATE INDEX chunks_owner ON chunks (owner_id);
