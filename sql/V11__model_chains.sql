-- Several LLM endpoints and per-template model chains: a template's ordered models, and which
-- endpoint and model answered each call and each reply (NULL where no LLM answered: a fallback
-- or throttled reply, and every row of an earlier release). `response_format` is how JSON was
-- asked for (json_schema, json_object_schema, json_object, prompt; NULL for text and failures).
ALTER TABLE templates ADD COLUMN models text[] NOT NULL DEFAULT '{}', ADD COLUMN context_tokens integer;
ALTER TABLE llm_calls ADD COLUMN endpoint text, ADD COLUMN response_format text;
ALTER TABLE messages ADD COLUMN model text, ADD COLUMN endpoint text;

-- The rolling summary of a conversation's older turns (made by a `summary` template after a
-- reply, `[business.history]`), and the last message it covers: the history starts after it.
ALTER TABLE conversations ADD COLUMN summary text NOT NULL DEFAULT '',
  ADD COLUMN summarized_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE templates DROP CONSTRAINT templates_kind_check;
ALTER TABLE templates ADD CONSTRAINT templates_kind_check
  CHECK (kind IN ('selection', 'extraction', 'response', 'fallback', 'summary'));
ALTER TABLE llm_calls DROP CONSTRAINT llm_calls_purpose_check;
ALTER TABLE llm_calls ADD CONSTRAINT llm_calls_purpose_check
  CHECK (purpose IN ('selection', 'extraction', 'response', 'summary'));
