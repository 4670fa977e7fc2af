-- The dashboard's rates (GET /api/v1/admin/queue): jobs enqueued and finished per
-- 30-second bucket over the last ten minutes.  Both scans read a short, recent
-- range of one of these indexes instead of the whole jobs table.

CREATE INDEX IF NOT EXISTS jobs_queued_at ON jobs (queued_at) WHERE queued_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Every user's jobs, newest first (GET /api/v1/admin/jobs): the keyset pager's order.
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at DESC, id DESC);
