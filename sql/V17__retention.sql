-- Retention (docs/operations.md, "Personal data"): the businesses whose definitions limit how
-- long their users' data is kept (`[business.retention]`, in `businesses.policy`), for the
-- sweep that every worker runs, which then acts on each business scoped to it (as
-- icmp_due_actions). (PL/pgSQL: Citus cannot plan a parameterised SQL function over a
-- distributed table.)
CREATE FUNCTION icmp_retention_policies() RETURNS TABLE (business_id uuid, retention jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
BEGIN
  RETURN QUERY
  SELECT b.id, b.policy -> 'retention' FROM businesses b
   WHERE b.policy ? 'retention' ORDER BY b.id;
END
$$;

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    GRANT EXECUTE ON FUNCTION icmp_retention_policies() TO icmp_worker;
  END IF;
END
$$;
