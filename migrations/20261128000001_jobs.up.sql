-- Training jobs: the queue and the record of every job's lifecycle.
CREATE TABLE jobs (
    id                   uuid PRIMARY KEY,
    project              text NOT NULL,
    adapter_name         text NOT NULL,
    spec                 jsonb NOT NULL,
    status               text NOT NULL CHECK (status IN ('validating', 'queued', 'scheduled', 'running',
                             'evaluating', 'publishing', 'succeeded', 'failed', 'cancel_requested', 'cancelled')),
    error_kind           text CHECK (error_kind IN ('user_error', 'system_error', 'safety_blocked', 'deadline_exceeded')),
    error_message        text,
    priority             integer NOT NULL DEFAULT 0,
    attempt              integer NOT NULL DEFAULT 0,
    max_attempts         integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    -- The worker of the current attempt holds the job until this time; heartbeats extend it.
    lease_expires_at     timestamptz,
    -- sha256 of the current attempt's worker token; the token itself is never stored.
    worker_token_sha256  bytea,
    idempotency_key      text,
    -- sha256 of the submitted body, so a reused Idempotency-Key with another body is refused.
    request_sha256       bytea NOT NULL,
    adapter_version      integer,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz,
    CONSTRAINT jobs_idempotency UNIQUE (project, idempotency_key)
);

-- The claim query walks this index: queued jobs by priority, then age.
CREATE INDEX jobs_queued ON jobs (priority DESC, created_at, id) WHERE status = 'queued';
-- The lease monitor looks for expired leases among jobs a worker holds.
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX jobs_project_created ON jobs (project, created_at DESC);
