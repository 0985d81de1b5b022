-- A job requeued after a system error waits until this time before it is claimed again.
ALTER TABLE jobs ADD COLUMN not_before timestamptz;
