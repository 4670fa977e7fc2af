-- Upload sessions: remember when the completed upload's job was handed to the queue,
-- so a completion interrupted between committing and enqueueing is finished later
-- (by a repeated complete or by the sweeper) without ever enqueueing twice.

ALTER TABLE upload_sessions ADD COLUMN enqueued_at timestamptz;

CREATE INDEX upload_sessions_not_enqueued ON upload_sessions (completed_at)
    WHERE status = 'completed' AND enqueued_at IS NULL;
