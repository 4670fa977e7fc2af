-- The worker pipeline: per-job stage checkpoints, so a retried or recovered job
-- skips the stages whose output is already stored (extracted pages, chunk plan,
-- embeddings per batch).  Rows are removed when the job reaches a final state.

CREATE TABLE job_checkpoints (
    job_id             uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    stage              text NOT NULL CHECK (stage IN ('validate', 'extract', 'chunk', 'embed')),
    part               integer NOT NULL DEFAULT 0,
    data               bytea NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, stage, part)
);

-- Queue depth per priority and the reaper's scans read active jobs only.
CREATE INDEX jobs_active ON jobs (status, priority) WHERE status IN ('queued', 'retrying', 'running');
