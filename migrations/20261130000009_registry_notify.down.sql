DROP TRIGGER adapter_aliases_changed ON adapter_aliases;
DROP TRIGGER adapter_versions_changed ON adapter_versions;
DROP FUNCTION loraforge_registry_changed();
