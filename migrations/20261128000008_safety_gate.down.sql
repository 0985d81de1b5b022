ALTER TABLE adapter_versions DROP COLUMN safety_verdict, DROP COLUMN evaluation;
ALTER TABLE jobs DROP COLUMN safety_policy;
DROP TABLE safety_policies;
