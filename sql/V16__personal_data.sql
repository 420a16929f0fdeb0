-- Personal data (docs/operations.md, "Personal data"): erasures that in-flight messages cannot
-- undo, retention sweeps, and the operators' audit trail.

-- One row per erased user: `user_key` is the SHA-256 (hex) of the user's id, never the id
-- itself; (`erased_ms`, `erased_seq`) is the instant of the erase as an entry id of the user's
-- inbound stream (its last id when the erase took the user's row). The write set refuses to
-- start a conversation for a user erased at or after the arrival of the message it stores (its
-- entry id no later than that), so that a message received before the erase and still in
-- flight does not bring the user back; a message that arrived later is a new user's.
CREATE TABLE user_erasures (
    business_id  uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    user_key     text NOT NULL,
    erased_ms    bigint NOT NULL,
    erased_seq   bigint NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, user_key)
);
ALTER TABLE user_erasures ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON user_erasures USING (business_id = icmp_scope())
  WITH CHECK (business_id = icmp_scope());

-- What operators did to user data: who, when, what, of which business and user (the user as
-- `user_key`, like user_erasures), and counts; never the data itself. Append-only: rows can be
-- added and read, never changed or removed, by anyone (the trigger holds for the owner too).
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    actor        text NOT NULL,
    action       text NOT NULL,
    business_id  uuid,
    user_key     text,
    -- What the action names besides a user: a dead letter's id, an action request's id, ….
    target       text,
    counts       jsonb NOT NULL DEFAULT '{}',
    outcome      text NOT NULL DEFAULT 'ok'
);
CREATE INDEX audit_log_by_business ON audit_log (business_id, at);

CREATE FUNCTION icmp_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_log is append-only' USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION icmp_audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
  FOR EACH STATEMENT EXECUTE FUNCTION icmp_audit_log_append_only();

-- Retention sweeps find old rows by time: BRIN indexes, a few pages each, nearly free to keep
-- up on inserts, and rows are inserted in time order.
CREATE INDEX messages_created_brin ON messages USING brin (created_at);
CREATE INDEX llm_calls_created_brin ON llm_calls USING brin (created_at);

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    -- The write set reads erasures; the retention sweep, which runs in workers, deletes what
    -- its business keeps no longer (row-level security scopes it like every worker query).
    GRANT SELECT ON user_erasures TO icmp_worker;
    GRANT DELETE ON users, conversations, messages, extracted_data, stage_transitions,
      llm_calls, action_outbox TO icmp_worker;
    -- Workers do not touch the audit trail.
    REVOKE ALL ON audit_log FROM icmp_worker;
  END IF;
END
$$;
