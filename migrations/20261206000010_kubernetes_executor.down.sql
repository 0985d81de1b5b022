ALTER TABLE jobs DROP COLUMN attempt_started_at;
UPDATE jobs SET error_kind = 'system_error' WHERE error_kind = 'resource_exhausted';
ALTER TABLE jobs DROP CONSTRAINT jobs_error_kind_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_error_kind_check
    CHECK (error_kind IN ('user_error', 'system_error', 'safety_blocked', 'deadline_exceeded'));
