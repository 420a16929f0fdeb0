-- The rows written for every message no longer reference definition rows by foreign key.
-- Each such key made every message's transaction take a FOR KEY SHARE lock on its stage's and
-- templates' rows: the same few rows for every message of a business, so that concurrent
-- transactions shared those locks through multixacts, the hottest part of the write set
-- (docs/performance.md, "Foreign keys to definitions"). The ids stay; they always name rows
-- that exist, because a write set takes them from the definitions it read and definitions are
-- never deleted (an import adds versions and updates rows in place). Keys between a message's
-- own rows (conversation, user, message) stay, as do the definitions' keys among themselves.
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_business_id_stage_id_fkey;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_fallback_template_fkey;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_template_fkey;
ALTER TABLE llm_calls DROP CONSTRAINT IF EXISTS llm_calls_business_id_template_id_fkey;
ALTER TABLE stage_transitions DROP CONSTRAINT IF EXISTS stage_transitions_business_id_from_stage_id_fkey;
ALTER TABLE stage_transitions DROP CONSTRAINT IF EXISTS stage_transitions_business_id_to_stage_id_fkey;
ALTER TABLE conversations DROP CONSTRAINT IF EXISTS conversations_business_id_current_stage_id_fkey;
