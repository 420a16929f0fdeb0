-- Tenant isolation enforced by the database: every tenant table gets a row-level security
-- policy that admits only the rows of the business the transaction is scoped to
-- (`set_config('icmp.business_id', …, true)`, done by every worker query). Workers connect as
-- (or switch to) the role icmp_worker, which does not own the tables, so the policies apply to
-- them; migrations and `icmp import` run as the owner, which they do not restrict. A
-- transaction without the setting sees no rows and can write none.
--
-- `icmp migrate` creates the role icmp_worker (NOLOGIN) if it can and grants it to the migrating
-- user, before this runs.

-- The last single-column foreign keys become composite, like all the others.
ALTER TABLE messages ADD CONSTRAINT messages_business_id_id_key UNIQUE (business_id, id);
ALTER TABLE extracted_data
  DROP CONSTRAINT extracted_data_source_message_id_fkey,
  ADD CONSTRAINT extracted_data_source_message_fkey FOREIGN KEY (business_id, source_message_id)
    REFERENCES messages (business_id, id) ON DELETE SET NULL (source_message_id);
ALTER TABLE stage_transitions
  DROP CONSTRAINT stage_transitions_message_id_fkey,
  ADD CONSTRAINT stage_transitions_message_fkey FOREIGN KEY (business_id, message_id)
    REFERENCES messages (business_id, id) ON DELETE SET NULL (message_id);
ALTER TABLE llm_calls
  DROP CONSTRAINT llm_calls_message_id_fkey,
  ADD CONSTRAINT llm_calls_message_fkey FOREIGN KEY (business_id, message_id)
    REFERENCES messages (business_id, id) ON DELETE SET NULL (message_id);

-- The business the current transaction is scoped to; NULL (no rows) when unset.
CREATE FUNCTION icmp_scope() RETURNS uuid LANGUAGE sql STABLE AS $$
  SELECT nullif(current_setting('icmp.business_id', true), '')::uuid
$$;

ALTER TABLE businesses ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON businesses USING (id = icmp_scope()) WITH CHECK (id = icmp_scope());

DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['templates', 'stages', 'users', 'conversations', 'messages',
                           'extracted_data', 'stage_transitions', 'llm_calls'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY tenant ON %I USING (business_id = icmp_scope()) '
                   'WITH CHECK (business_id = icmp_scope())', t);
  END LOOP;
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO icmp_worker', current_schema());
    GRANT SELECT ON businesses, templates, stages TO icmp_worker;
    GRANT SELECT, INSERT, UPDATE ON users, conversations, messages, extracted_data,
      stage_transitions, llm_calls TO icmp_worker;
    GRANT USAGE ON SEQUENCE messages_seq_seq, stage_transitions_id_seq TO icmp_worker;
    GRANT EXECUTE ON FUNCTION icmp_scope() TO icmp_worker;
  END IF;
END
$$;
