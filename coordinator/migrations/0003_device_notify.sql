-- Every committed change of a device row notifies channel `spa_devices` with the device's id,
-- whoever wrote it: each coordinator's device cache drops that entry (store/postgres/cache.rs).
CREATE FUNCTION spa_devices_notify() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('spa_devices', OLD.device_id);
    ELSE
        PERFORM pg_notify('spa_devices', NEW.device_id);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION spa_devices_notify();
