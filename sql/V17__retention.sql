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

-- The rows that point at a message (its LLM calls, its stage transition, the extracted values
-- it was the source of) no longer reference it by foreign key. Deleting a message (the
-- retention sweep) had PostgreSQL look for such rows once per message, through indexes that do
-- not lead with those columns: seconds per batch. The sweep deletes or unlinks those rows
-- itself, in the same transaction, before the messages. The write set writes them with the
-- message they point at, in one transaction, so they still always name a message that exists;
-- and it no longer takes a lock on the message row to check it (as V15 did for definitions).
ALTER TABLE extracted_data DROP CONSTRAINT IF EXISTS extracted_data_source_message_fkey;
ALTER TABLE stage_transitions DROP CONSTRAINT IF EXISTS stage_transitions_message_fkey;
ALTER TABLE llm_calls DROP CONSTRAINT IF EXISTS llm_calls_message_fkey;
