-- Registered inputs (base models, datasets), aliases and tags of adapter versions,
-- and lineage edges from a version to its parent version.
CREATE TABLE base_models (
    project        text NOT NULL,
    name           text NOT NULL,
    uri            text NOT NULL,
    sha256         text NOT NULL,
    size           bigint NOT NULL,
    format         text NOT NULL,
    -- Set when this base was made by merging an adapter version into another base.
    source_adapter text,
    source_version integer,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, name)
);

CREATE TABLE datasets (
    project     text NOT NULL,
    name        text NOT NULL,
    uri         text NOT NULL,
    sha256      text NOT NULL,
    size        bigint NOT NULL,
    format      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, name)
);

CREATE TABLE adapter_aliases (
    project       text NOT NULL,
    adapter_name  text NOT NULL,
    alias         text NOT NULL,
    version       integer NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project, adapter_name, alias),
    FOREIGN KEY (project, adapter_name, version) REFERENCES adapter_versions (project, adapter_name, version)
);

ALTER TABLE adapter_versions
    ADD COLUMN tags text[] NOT NULL DEFAULT '{}',
    ADD COLUMN base_model_name text,
    ADD COLUMN dataset_name text,
    ADD COLUMN deleted_at timestamptz;

-- Filters of the adapter list, and the children of a version for `descendants`.
CREATE INDEX adapter_versions_base ON adapter_versions (project, base_model_uri);
CREATE INDEX adapter_versions_tags ON adapter_versions USING gin (tags);
CREATE INDEX adapter_versions_parent ON adapter_versions (project, parent_adapter, parent_version)
    WHERE parent_adapter IS NOT NULL;

-- What a job was submitted with, when it named registered inputs or a parent version.
ALTER TABLE jobs
    ADD COLUMN base_model_name text,
    ADD COLUMN dataset_name text,
    ADD COLUMN parent_adapter text,
    ADD COLUMN parent_version integer;
