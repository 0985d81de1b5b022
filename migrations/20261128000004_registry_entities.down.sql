ALTER TABLE jobs DROP COLUMN parent_version, DROP COLUMN parent_adapter, DROP COLUMN dataset_name, DROP COLUMN base_model_name;
DROP INDEX adapter_versions_parent;
DROP INDEX adapter_versions_tags;
DROP INDEX adapter_versions_base;
ALTER TABLE adapter_versions DROP COLUMN deleted_at, DROP COLUMN dataset_name, DROP COLUMN base_model_name, DROP COLUMN tags;
DROP TABLE adapter_aliases;
DROP TABLE datasets;
DROP TABLE base_models;
