-- The safety gate: a policy per project, the effective policy each job ran under (fixed
-- at submission), and each version's evaluation and verdict.
CREATE TABLE safety_policies (
    project     text PRIMARY KEY,
    policy      jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE jobs ADD COLUMN safety_policy jsonb;
ALTER TABLE adapter_versions
    ADD COLUMN evaluation jsonb,
    ADD COLUMN safety_verdict jsonb;
