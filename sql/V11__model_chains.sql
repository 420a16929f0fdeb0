-- Several LLM endpoints and per-template model chains: a template's ordered models, and which
-- endpoint and model answered each call and each reply (NULL where no LLM answered: a fallback
-- or throttled reply, and every row of an earlier release). `response_format` is how JSON was
-- asked for (json_schema, json_object_schema, json_object, prompt; NULL for text and failures).
ALTER TABLE templates ADD COLUMN models text[] NOT NULL DEFAULT '{}';
ALTER TABLE llm_calls ADD COLUMN endpoint text, ADD COLUMN response_format text;
ALTER TABLE messages ADD COLUMN model text, ADD COLUMN endpoint text;
