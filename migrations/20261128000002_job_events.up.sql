-- Everything that happens to a job: transitions, progress, worker log lines.
CREATE TABLE job_events (
    seq         bigserial PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind        text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX job_events_by_job ON job_events (job_id, seq);
