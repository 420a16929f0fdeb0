-- Stage actions' results reach the conversation: the latest result of each action (what later
-- templates see as `actions.<name>`), and an action's follow-up message to the user, stored in
-- the conversation and published once to where the firing message's reply went.
ALTER TABLE conversations ADD COLUMN actions jsonb NOT NULL DEFAULT '{}';

ALTER TABLE action_outbox
    -- The firing message's `reply_to` (NULL: the outbound stream).
    ADD COLUMN reply_to              text,
    -- The action's follow-up template, as it was when the action fired (NULL: none).
    ADD COLUMN follow_up             text,
    -- The follow-up's message id (its `reply_id`) and text, once the result is in.
    ADD COLUMN follow_up_id          uuid,
    ADD COLUMN follow_up_text        text,
    ADD COLUMN follow_up_published_at timestamptz;

-- Follow-ups stored but not published yet (the process that stored one stopped first).
CREATE INDEX action_outbox_unpublished ON action_outbox (updated_at)
    WHERE follow_up_id IS NOT NULL AND follow_up_published_at IS NULL;

-- As icmp_due_actions: every business's rows, for the dispatcher to publish each scoped to its
-- business. `older_ms` leaves the rows a live dispatcher is publishing right now alone.
CREATE FUNCTION icmp_unpublished_follow_ups(n integer, older_ms integer)
RETURNS TABLE (business_id uuid, id uuid)
LANGUAGE plpgsql STABLE SECURITY DEFINER
AS $$
BEGIN
  RETURN QUERY
  SELECT o.business_id, o.id FROM action_outbox o
   WHERE o.follow_up_id IS NOT NULL AND o.follow_up_published_at IS NULL
     AND o.updated_at < now() - older_ms * interval '1 millisecond'
   ORDER BY o.updated_at LIMIT n;
END
$$;

DO $$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'icmp_worker') THEN
    GRANT EXECUTE ON FUNCTION icmp_unpublished_follow_ups(integer, integer) TO icmp_worker;
  END IF;
END
$$;
