-- Stage actions (effectively-once webhooks): a stage's actions, as its definition lists them,
-- and the outbox their requests wait in. An outbox row is written in the transaction that
-- commits the message firing it, so it exists if and only if that message committed; its
-- idempotency key (business, conversation, message, action) keeps a redelivered or replayed
-- message from writing a second one.
ALTER TABLE stages ADD COLUMN actions jsonb NOT NULL DEFAULT '[]';

CREATE TABLE action_outbox (
    business_id      uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    id               uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    message_id       uuid,
    action           text NOT NULL,
    idempotency_key  text NOT NULL,
    url              text NOT NULL,
    body             jsonb NOT NULL,
    timeout_ms       integer NOT NULL,
    max_attempts     integer NOT NULL,
    -- pending → delivered (2xx) | rejected (a final 4xx) | dead (attempts spent) | cancelled
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'rejected', 'dead', 'cancelled')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- A dispatcher's claim: no other takes the row before this passes.
    claimed_until    timestamptz,
    last_status      integer,
    last_error       text,
    latency_ms       integer,
    response         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (business_id, id),
    UNIQUE (business_id, idempotency_key),
    FOREIGN KEY (business_id, conversation_id) REFERENCES conversations (business_id, id) ON DELETE CASCADE
);
CREATE INDEX action_outbox_due ON action_outbox (next_attempt_at) WHERE status = 'pending';

-- Workers see only the rows of the business their transaction is scoped to; the dispatcher
-- finds due rows of every business through this function (the owner's view), then claims and
-- updates each scoped to its business. (On Citus it reads every shard: allowed here, whatever
-- the session's multi-shard setting.)
-- (PL/pgSQL: Citus cannot plan a parameterised SQL function over a distributed table.)
CREATE FUNCTION icmp_due_actions(n integer) RETURNS TABLE (business_id uuid, id uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
BEGIN
  RETURN QUERY
  SELECT o.business_id, o.id FROM action_outbox o
   WHERE o.status = 'pending' AND o.next_attempt_at <= now()
     AND (o.claimed_until IS NULL OR o.claimed_until < now())
   ORDER BY o.next_attempt_at LIMIT n;
END
$$;

ALTER TABLE action_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON action_outbox USING (business_id = icmp_scope())
  WITH CHECK (business_id = icmp_scope());
DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    GRANT SELECT, INSERT, UPDATE ON action_outbox TO icmp_worker;
    GRANT EXECUTE ON FUNCTION icmp_due_actions(integer) TO icmp_worker;
  END IF;
END
$$;
