-- Every reply names the template (and version) it came from: the response template for an
-- answer of the LLM, the fallback template for a fallback reply (NULL for the last-resort text
-- and for user messages). So a template change can be traced message by message.
ALTER TABLE messages
  ADD COLUMN template_id uuid,
  ADD COLUMN template_version integer,
  ADD CONSTRAINT messages_template_fkey
    FOREIGN KEY (business_id, template_id) REFERENCES templates (business_id, id);
