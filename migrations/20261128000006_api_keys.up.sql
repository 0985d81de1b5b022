-- API keys: each belongs to a project and has a scope. Only a hash of the secret is kept.
CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    project     text NOT NULL,
    scope       text NOT NULL CHECK (scope IN ('read', 'submit', 'admin')),
    -- Shown in listings so a key can be recognised without revealing it.
    prefix      text NOT NULL,
    key_sha256  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
