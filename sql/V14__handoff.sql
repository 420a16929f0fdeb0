-- Human handoff: a conversation handed to a person. While `handoff` is set, the user's messages
-- are stored and passed to the agents' stream instead of reaching the LLM, and agents' answers
-- are stored as messages of role `agent`. A stage may hand over (`stages.handoff`).
ALTER TABLE conversations ADD COLUMN handoff jsonb;
ALTER TABLE stages ADD COLUMN handoff boolean NOT NULL DEFAULT false;
-- The results of an action that hand the conversation over (`handoff_on`), as it fired.
ALTER TABLE action_outbox ADD COLUMN handoff_on jsonb;

ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_role_check;
ALTER TABLE messages ADD CONSTRAINT messages_role_check
    CHECK (role IN ('user', 'assistant', 'agent'));

-- Conversations in handoff that no agent has answered yet, and those whose timeout reply is
-- stored but not published yet, for the timeout sweep.
CREATE INDEX conversations_open_handoff ON conversations (((handoff ->> 'due_ms')::bigint))
    WHERE handoff IS NOT NULL AND (handoff ->> 'timeout_published') IS NULL;

-- Every business's handoffs that no agent answered and whose timeout (`due_ms`, unix
-- milliseconds, set when the handoff started; none when the business has no timeout) is before
-- `before_ms`, those timed out whose reply is not published yet, and those started more than
-- 2 s ago whose agents were not told yet (`told`), for the process that watches them to act on
-- each scoped to its business (as icmp_due_actions).
CREATE FUNCTION icmp_unanswered_handoffs(n integer, before_ms bigint)
RETURNS TABLE (business_id uuid, id uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
BEGIN
  RETURN QUERY
  SELECT c.business_id, c.id FROM conversations c
   WHERE c.handoff IS NOT NULL AND (c.handoff ->> 'timeout_published') IS NULL
     AND (((c.handoff ->> 'answered') IS NULL AND (c.handoff ->> 'timed_out') IS NULL
           AND (c.handoff ->> 'due_ms')::bigint < before_ms)
          OR (c.handoff ->> 'timed_out') IS NOT NULL
          OR ((c.handoff ->> 'told') IS NULL
              AND (c.handoff ->> 'since_ms')::bigint < before_ms - 2000))
   ORDER BY (c.handoff ->> 'due_ms')::bigint LIMIT n;
END
$$;

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    GRANT EXECUTE ON FUNCTION icmp_unanswered_handoffs(integer, bigint) TO icmp_worker;
  END IF;
END
$$;
