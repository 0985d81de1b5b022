-- A worker that ran out of its memory or GPU memory fails as resource_exhausted (not retried).
ALTER TABLE jobs DROP CONSTRAINT jobs_error_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_error_kind_check
    CHECK (error_kind IN ('user_error', 'system_error', 'safety_blocked', 'deadline_exceeded', 'resource_exhausted'));

-- When the current attempt was claimed: reconciliation gives a new attempt time to get its
-- worker created before calling that worker vanished.
ALTER TABLE jobs ADD COLUMN attempt_started_at timestamptz;
