-- The stages selection may move a conversation to from each stage, by name (NULL: any stage).
-- A selection outside them keeps the current stage (error code validation.stage_transition).
ALTER TABLE stages ADD COLUMN next_stages text[];
