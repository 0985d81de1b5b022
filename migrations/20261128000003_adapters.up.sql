-- The adapter registry: adapters, their immutable numbered versions, and lineage.
CREATE TABLE adapters (
    project       text NOT NULL,
    name          text NOT NULL,
    -- The number the next reserved version gets; versions count from 1 per adapter.
    next_version  integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, name)
);

CREATE TABLE adapter_versions (
    project            text NOT NULL,
    adapter_name       text NOT NULL,
    version            integer NOT NULL CHECK (version >= 1),
    status             text NOT NULL CHECK (status IN ('pending', 'ready', 'quarantined', 'failed', 'deleted')),
    job_id             uuid NOT NULL REFERENCES jobs (id),
    -- Storage path of the version's files, relative to the store root.
    storage_prefix     text NOT NULL,
    files              jsonb NOT NULL DEFAULT '[]',
    method             jsonb NOT NULL,
    hyperparameters    jsonb NOT NULL,
    metrics            jsonb,
    manifest           jsonb,
    base_model_uri     text NOT NULL,
    base_model_sha256  text,
    dataset_uri        text NOT NULL,
    dataset_sha256     text,
    parent_adapter     text,
    parent_version     integer,
    created_at         timestamptz NOT NULL DEFAULT now(),
    ready_at           timestamptz,
    PRIMARY KEY (project, adapter_name, version),
    FOREIGN KEY (project, adapter_name) REFERENCES adapters (project, name)
);

CREATE INDEX adapter_versions_job ON adapter_versions (job_id);
