-- Every change of a business, stage or template notifies `icmp_definitions` with the business
-- id, whether it came from `icmp import` or from a direct SQL edit: running workers drop their
-- in-process and Redis copies of that business's definitions at once (no restart, no TTL wait).
CREATE FUNCTION icmp_definitions_changed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  business uuid;
BEGIN
  IF TG_TABLE_NAME = 'businesses' THEN
    business := COALESCE(NEW.id, OLD.id);
  ELSE
    business := COALESCE(NEW.business_id, OLD.business_id);
  END IF;
  PERFORM pg_notify('icmp_definitions', business::text);
  RETURN NULL;
END
$$;

CREATE TRIGGER businesses_changed AFTER INSERT OR UPDATE OR DELETE ON businesses
  FOR EACH ROW EXECUTE FUNCTION icmp_definitions_changed();
CREATE TRIGGER stages_changed AFTER INSERT OR UPDATE OR DELETE ON stages
  FOR EACH ROW EXECUTE FUNCTION icmp_definitions_changed();
CREATE TRIGGER templates_changed AFTER INSERT OR UPDATE OR DELETE ON templates
  FOR EACH ROW EXECUTE FUNCTION icmp_definitions_changed();
