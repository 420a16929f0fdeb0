-- icmp data model (DESIGN §6). Every tenant row carries business_id; composite foreign keys
-- (business_id, id) make it impossible for a row of one business to point at another's.

CREATE TABLE businesses (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE templates (
    id             uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    business_id    uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    name           text NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('selection', 'extraction', 'response', 'fallback')),
    system         text NOT NULL DEFAULT '',
    body           text NOT NULL,
    model          text,
    temperature    real,
    max_tokens     integer,
    output_schema  jsonb,
    version        integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, name),
    UNIQUE (business_id, id)
);

CREATE TABLE stages (
    id                      uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    business_id             uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    name                    text NOT NULL,
    description             text NOT NULL DEFAULT '',
    position                integer NOT NULL DEFAULT 0,
    is_initial              boolean NOT NULL DEFAULT false,
    selection_template_id   uuid,
    extraction_template_id  uuid,
    response_template_id    uuid NOT NULL,
    fallback_template_id    uuid,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, name),
    UNIQUE (business_id, id),
    FOREIGN KEY (business_id, selection_template_id) REFERENCES templates (business_id, id),
    FOREIGN KEY (business_id, extraction_template_id) REFERENCES templates (business_id, id),
    FOREIGN KEY (business_id, response_template_id) REFERENCES templates (business_id, id),
    FOREIGN KEY (business_id, fallback_template_id) REFERENCES templates (business_id, id)
);
-- One initial stage per business.
CREATE UNIQUE INDEX stages_one_initial ON stages (business_id) WHERE is_initial;

CREATE TABLE users (
    id           uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    business_id  uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    external_id  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, external_id),
    UNIQUE (business_id, id)
);

CREATE TABLE conversations (
    id                uuid PRIMARY KEY,
    business_id       uuid NOT NULL REFERENCES businesses (id) ON DELETE CASCADE,
    user_id           uuid NOT NULL,
    current_stage_id  uuid NOT NULL,
    -- Optimistic concurrency: bumped by every committed message.
    version           bigint NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (business_id, id),
    FOREIGN KEY (business_id, user_id) REFERENCES users (business_id, id),
    FOREIGN KEY (business_id, current_stage_id) REFERENCES stages (business_id, id)
);
-- "The user's latest conversation" lookup.
CREATE INDEX conversations_by_user ON conversations (business_id, user_id, updated_at DESC);

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    -- Insertion order; history is read in this order.
    seq              bigserial NOT NULL UNIQUE,
    business_id      uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    role             text NOT NULL CHECK (role IN ('user', 'assistant')),
    content          text NOT NULL,
    -- The producer's message_id, else the inbound stream entry id.
    idempotency_key  text NOT NULL,
    stage_id         uuid,
    -- Assistant rows: 'ok' or 'fallback'.
    status           text,
    metadata         jsonb,
    inbound_id       text,
    log_id           uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (business_id, conversation_id) REFERENCES conversations (business_id, id) ON DELETE CASCADE,
    FOREIGN KEY (business_id, stage_id) REFERENCES stages (business_id, id),
    -- The idempotency key: one user row and one assistant row per key and business.
    UNIQUE (business_id, idempotency_key, role)
);
CREATE INDEX messages_history ON messages (conversation_id, seq DESC);

CREATE TABLE extracted_data (
    business_id        uuid NOT NULL,
    conversation_id    uuid NOT NULL,
    field              text NOT NULL,
    value              jsonb NOT NULL,
    source_message_id  uuid REFERENCES messages (id) ON DELETE SET NULL,
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, field),
    FOREIGN KEY (business_id, conversation_id) REFERENCES conversations (business_id, id) ON DELETE CASCADE
);

CREATE TABLE stage_transitions (
    id               bigserial PRIMARY KEY,
    business_id      uuid NOT NULL,
    conversation_id  uuid NOT NULL,
    from_stage_id    uuid NOT NULL,
    to_stage_id      uuid NOT NULL,
    message_id       uuid REFERENCES messages (id) ON DELETE SET NULL,
    log_id           uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (business_id, conversation_id) REFERENCES conversations (business_id, id) ON DELETE CASCADE,
    FOREIGN KEY (business_id, from_stage_id) REFERENCES stages (business_id, id),
    FOREIGN KEY (business_id, to_stage_id) REFERENCES stages (business_id, id)
);
CREATE INDEX stage_transitions_by_conversation ON stage_transitions (conversation_id, id);

CREATE TABLE llm_calls (
    id                 uuid PRIMARY KEY,
    business_id        uuid NOT NULL,
    conversation_id    uuid NOT NULL,
    message_id         uuid REFERENCES messages (id) ON DELETE SET NULL,
    purpose            text NOT NULL CHECK (purpose IN ('selection', 'extraction', 'response')),
    template_id        uuid,
    template_version   integer,
    model              text NOT NULL,
    prompt             text NOT NULL,
    output             text,
    prompt_tokens      integer,
    completion_tokens  integer,
    latency_ms         integer NOT NULL,
    -- 'ok' or an error code such as 'llm.timeout'.
    outcome            text NOT NULL,
    log_id             uuid NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (business_id, conversation_id) REFERENCES conversations (business_id, id) ON DELETE CASCADE,
    FOREIGN KEY (business_id, template_id) REFERENCES templates (business_id, id)
);
CREATE INDEX llm_calls_by_conversation ON llm_calls (conversation_id, created_at);
CREATE INDEX llm_calls_by_message ON llm_calls (message_id);
