-- The W3C trace context of the span that fired a stage action (docs/protocol.md, "Trace
-- context"): the dispatcher's request and the action's follow-up continue that trace. NULL for
-- rows written without span export, and for rows of the previous release (nullable, no
-- default: adding the columns rewrites nothing, and the previous release's inserts, which name
-- their columns, go on working).
ALTER TABLE action_outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
