-- Every replica caches registry answers (resolve, versions/{v}) and evicts an adapter's
-- answers when this notification arrives, at the commit of any change to its versions or
-- aliases. The payload is '<project>/<adapter>' (adapter names cannot contain '/').
CREATE FUNCTION loraforge_registry_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        PERFORM pg_notify('loraforge_registry', OLD.project || '/' || OLD.adapter_name);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM pg_notify('loraforge_registry', NEW.project || '/' || NEW.adapter_name);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER adapter_versions_changed AFTER INSERT OR UPDATE OR DELETE ON adapter_versions
    FOR EACH ROW EXECUTE FUNCTION loraforge_registry_changed();
CREATE TRIGGER adapter_aliases_changed AFTER INSERT OR UPDATE OR DELETE ON adapter_aliases
    FOR EACH ROW EXECUTE FUNCTION loraforge_registry_changed();
