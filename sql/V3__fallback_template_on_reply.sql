-- A fallback reply names the template (and version) it was rendered from, so it can be
-- explained from the database alone.
ALTER TABLE messages
  ADD COLUMN fallback_template_id uuid,
  ADD COLUMN fallback_template_version integer,
  ADD CONSTRAINT messages_fallback_template_fkey
    FOREIGN KEY (business_id, fallback_template_id) REFERENCES templates (business_id, id);
