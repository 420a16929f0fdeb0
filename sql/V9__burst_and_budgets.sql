-- Per-business burst policy and budgets (the definition file's `[business.burst]` and
-- `[business.budget]`), and the link from the messages of a coalesced turn to the one reply
-- that answered them.
ALTER TABLE businesses ADD COLUMN policy jsonb NOT NULL DEFAULT '{}';

-- User rows answered by a reply stored under another idempotency key (the later messages of a
-- coalesced turn): the assistant message that answered them. The first message of the turn
-- shares the reply's idempotency key, as every other message does.
ALTER TABLE messages ADD COLUMN answered_by uuid;
CREATE INDEX messages_answered_by ON messages (answered_by) WHERE answered_by IS NOT NULL;
