-- How long each step of a message took (read, select, extract, respond; milliseconds), stored
-- with its reply so that `icmp trace` explains a message after the fact.
ALTER TABLE messages ADD COLUMN timings jsonb;
