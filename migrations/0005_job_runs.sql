-- The execution ledger (issue 12): one row per execution of a job by a worker,
-- inserted when the worker takes the job's lease and closed in the same
-- transaction as the state the execution ended in.  A row left open (ended_at
-- NULL) is an execution that died with its worker; the reaper, or the next
-- worker that takes the job over, closes it as 'lost'.  "Exactly once" is read
-- here: a finished job has exactly one row with a terminal outcome.

CREATE TABLE job_runs (
    id                 bigserial PRIMARY KEY,
    job_id             uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt            integer NOT NULL,             -- jobs.attempts when it started
    worker_id          text NOT NULL,
    lease_token        text NOT NULL,                -- jobs.lease_owner during the run
    started_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at           timestamptz,
    outcome            text CHECK (outcome IN ('completed', 'deduplicated', 'failed', 'cancelled',
                                               'retrying', 'requeued', 'deferred', 'skipped',
                                               'lost')),
    CHECK ((ended_at IS NULL) = (outcome IS NULL))
);
CREATE INDEX job_runs_job ON job_runs (job_id, id);
CREATE INDEX job_runs_open ON job_runs (job_id) WHERE ended_at IS NULL;
