DROP TABLE adapter_versions;
DROP TABLE adapters;
