-- Every primary and unique key includes business_id, the column a distributed database
-- (Citus) shards the tenant tables by: `icmp migrate` on a database with the citus extension
-- then distributes them, co-located (docs/operations.md). On plain PostgreSQL this only
-- widens keys: (business_id, id) was unique already, every foreign key keeps its name and its
-- meaning, and no row changes.

DO $$
DECLARE
  fk record;
  fks text[] := '{}';
  stmt text;
  t text;
BEGIN
  -- The foreign keys point at the keys that change: taken off, and put back as they were.
  FOR fk IN
    SELECT c.conrelid::regclass AS tbl, c.conname, pg_get_constraintdef(c.oid) AS def
      FROM pg_constraint c
     WHERE c.contype = 'f' AND c.connamespace = current_schema()::regnamespace
       AND c.confrelid::regclass::text <> 'businesses'
  LOOP
    -- A row pointing at a message (its LLM calls, its stage transition, the extracted values
    -- it was the source of) no longer has the reference nulled when that message alone is
    -- deleted: Citus cannot null part of a key that holds the distribution column. Nothing
    -- deletes single messages; a deleted conversation takes all of them with it, as before.
    fks := fks || format('ALTER TABLE %s ADD CONSTRAINT %I %s', fk.tbl, fk.conname,
                         regexp_replace(fk.def, ' ON DELETE SET NULL \(\w+\)', ''));
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', fk.tbl, fk.conname);
  END LOOP;

  FOREACH t IN ARRAY ARRAY['templates', 'stages', 'users', 'conversations', 'messages',
                           'stage_transitions', 'llm_calls'] LOOP
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', t, t || '_pkey');
    EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I', t, t || '_business_id_id_key');
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I PRIMARY KEY (business_id, id)', t, t || '_pkey');
  END LOOP;
  ALTER TABLE extracted_data DROP CONSTRAINT extracted_data_pkey,
    ADD CONSTRAINT extracted_data_pkey PRIMARY KEY (business_id, conversation_id, field);
  -- `seq` orders a conversation's messages (index messages_history); it need not be unique
  -- across businesses, which a distributed table could not enforce.
  ALTER TABLE messages DROP CONSTRAINT messages_seq_key;

  FOREACH stmt IN ARRAY fks LOOP
    EXECUTE stmt;
  END LOOP;
END
$$;

-- A message's `seq` is its place in its conversation, drawn from the conversation row that the
-- write set updates anyway (`last_seq`), not from a sequence: a sequence is drawn on the
-- coordinator of a distributed database, by pulling the rows there first. Existing
-- conversations continue after their last message.
ALTER TABLE conversations ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
UPDATE conversations c SET last_seq = m.last_seq
  FROM (SELECT business_id, conversation_id, max(seq) AS last_seq FROM messages
         GROUP BY business_id, conversation_id) m
 WHERE c.business_id = m.business_id AND c.id = m.conversation_id;
ALTER TABLE messages ALTER COLUMN seq DROP DEFAULT;
DROP SEQUENCE messages_seq_seq;

-- The write set's optimistic lock fails loudly: a conversation that is not at the version the
-- worker read (or not its user's) gets version 0, which this refuses, and the transaction with
-- it.
ALTER TABLE conversations ADD CONSTRAINT conversations_version_check CHECK (version > 0);
