-- The idempotency key is scoped to (business, user, key): another user's `message_id` is that
-- user's own message, and never finds the first user's reply.
ALTER TABLE messages ADD COLUMN user_id uuid;
UPDATE messages m SET user_id = c.user_id
  FROM conversations c
 WHERE c.business_id = m.business_id AND c.id = m.conversation_id;
ALTER TABLE messages ALTER COLUMN user_id SET NOT NULL;
ALTER TABLE messages
  ADD CONSTRAINT messages_user_fkey FOREIGN KEY (business_id, user_id) REFERENCES users (business_id, id);
ALTER TABLE messages DROP CONSTRAINT messages_business_id_idempotency_key_role_key;
ALTER TABLE messages
  ADD CONSTRAINT messages_idempotency_key UNIQUE (business_id, user_id, idempotency_key, role);
