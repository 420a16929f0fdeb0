#!/usr/bin/env python3
"""A peer built on the seed's own design, for `icmp bench --peer` only (docs/performance.md).

It does what the seed's `MessageHandler.process_message` describes: each message takes a
pooled connection and holds one transaction across its whole processing, LLM calls included.
It finds or creates the conversation, reads the stage (template ids cached in Redis), builds
the context (history and extracted data from the database, cached in Redis), then asks the LLM
for a stage, extracts data in the booking stage, and asks for the response. It saves both
messages and the LLM calls, updates the conversation and commits. The Redis state is written
after the commit. Then it publishes the reply and acknowledges the entry. Prompts are shaped like
the demo business's templates, and it talks to the same mock LLM as icmp.

It reads the same streams, group and services as `icmp worker` (the `ICMP__…` variables that
`icmp bench` gives its worker processes), keeps its tables in the schema `seed_peer`, and
runs `SEED_PEER_CONNECTIONS` (16) messages at once: the seed's pool size bounds how many
transactions can wait on the LLM at a time.

Needs `asyncpg`, `aiohttp` and `redis` (pip).
"""

import asyncio
import json
import os
import time
import uuid

import aiohttp
import asyncpg
import redis.asyncio as aioredis

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS seed_peer;
CREATE TABLE IF NOT EXISTS seed_peer.conversations (
    id uuid PRIMARY KEY, business_id uuid NOT NULL, user_id text NOT NULL,
    stage text NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX IF NOT EXISTS conversations_user
    ON seed_peer.conversations (business_id, user_id, updated_at DESC);
CREATE TABLE IF NOT EXISTS seed_peer.messages (
    id uuid PRIMARY KEY, conversation_id uuid NOT NULL REFERENCES seed_peer.conversations,
    role text NOT NULL, content text NOT NULL, message_id text, llm_call_id uuid,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE INDEX IF NOT EXISTS messages_history
    ON seed_peer.messages (conversation_id, created_at DESC);
CREATE TABLE IF NOT EXISTS seed_peer.stage_transitions (
    id bigserial PRIMARY KEY, conversation_id uuid NOT NULL REFERENCES seed_peer.conversations,
    from_stage text NOT NULL, to_stage text NOT NULL, created_at timestamptz DEFAULT now());
CREATE TABLE IF NOT EXISTS seed_peer.extracted_data (
    conversation_id uuid NOT NULL REFERENCES seed_peer.conversations, field text NOT NULL,
    value jsonb NOT NULL, PRIMARY KEY (conversation_id, field));
CREATE TABLE IF NOT EXISTS seed_peer.llm_calls (
    id uuid PRIMARY KEY, conversation_id uuid NOT NULL REFERENCES seed_peer.conversations,
    llm_call_id uuid NOT NULL, purpose text NOT NULL, prompt text NOT NULL, output text,
    latency_ms integer, created_at timestamptz NOT NULL DEFAULT now());
"""

STAGES = {
    "welcome": {"selection": "select_stage", "extraction": None, "response": "welcome_reply"},
    "booking": {"selection": "select_stage", "extraction": "extract_booking",
                "response": "booking_reply"},
    "farewell": {"selection": "select_stage", "extraction": None, "response": "farewell_reply"},
}

SELECT_SYSTEM = ("You route messages for {business}. Choose the stage that fits the patient's "
                 "latest message. Answer with a JSON object {{\"stage\": name}}.")
SELECT_BODY = ("Stages:\n- welcome: greetings and questions about the clinic\n"
               "- booking: booking an appointment\n- farewell: the patient says goodbye\n"
               "Current stage: {stage}\n{history}\nUser message: {content}")
EXTRACT_SYSTEM = ("Extract booking details from the patient's message. Answer with a JSON object "
                  "with any of the keys name, date, reason.")
EXTRACT_BODY = "Known so far: {known}\nUser message: {content}"
REPLY_SYSTEM = ("You are the friendly assistant of {business}, a dental clinic open Monday to "
                "Friday 8:00-18:00. Stage: {stage}.")
REPLY_BODY = "{history}\nKnown so far: {known}\nUser message: {content}"


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        raise SystemExit(f"seed-peer: {name} is not set")
    return value


class Peer:
    def __init__(self):
        self.inbound = env("ICMP__STREAMS__INBOUND")
        self.outbound = env("ICMP__STREAMS__OUTBOUND")
        self.group = env("ICMP__STREAMS__GROUP")
        self.consumer = env("ICMP__STREAMS__CONSUMER", "seed-peer")
        self.prefix = env("ICMP__REDIS__KEY_PREFIX", "seed:")
        self.llm = env("ICMP__LLM__BASE_URL").rstrip("/") + "/chat/completions"
        self.connections = int(env("SEED_PEER_CONNECTIONS", "16"))
        self.db_url = env("ICMP__DATABASE__URL")
        self.redis_url = env("ICMP__REDIS__URL")

    async def start(self):
        self.redis = aioredis.from_url(self.redis_url)
        self.pool = await asyncpg.create_pool(self.db_url, min_size=self.connections,
                                              max_size=self.connections)
        async with self.pool.acquire() as conn:
            await conn.execute(SCHEMA)
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            await self.redis.xgroup_create(self.inbound, self.group, id="0", mkstream=True)
        except aioredis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self):
        await self.start()
        queue = asyncio.Queue(maxsize=self.connections * 4)
        workers = [asyncio.create_task(self.work(queue)) for _ in range(self.connections)]
        while True:
            got = await self.redis.xreadgroup(self.group, self.consumer, {self.inbound: ">"},
                                              count=100, block=500)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    await queue.put((entry_id, fields))
            if any(w.done() for w in workers):
                for w in workers:
                    if w.done() and w.exception():
                        raise w.exception()

    async def work(self, queue):
        while True:
            entry_id, fields = await queue.get()
            f = {k.decode(): v.decode() for k, v in fields.items()}
            try:
                reply = await self.process(f)
                status = "ok"
            except Exception as e:  # the seed's step 14: roll back, answer with the error
                reply, status = f"error: {type(e).__name__}", "error"
            await self.redis.xadd(self.outbound, {"message_id": f.get("message_id", ""),
                                                  "status": status, "content": reply})
            await self.redis.xack(self.inbound, self.group, entry_id)

    async def call(self, conn, conversation_id, llm_call_id, purpose, system, body, json_mode):
        request = {"model": "mock", "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": body}]}
        if json_mode:
            request["response_format"] = {"type": "json_object"}
        started = time.monotonic()
        async with self.http.post(self.llm, json=request) as r:
            answer = (await r.json())["choices"][0]["message"]["content"]
        await conn.execute(
            "INSERT INTO seed_peer.llm_calls (id, conversation_id, llm_call_id, purpose, prompt,"
            " output, latency_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            uuid.uuid4(), conversation_id, llm_call_id, purpose, system + "\n" + body, answer,
            int((time.monotonic() - started) * 1000))
        return answer

    async def process(self, f):
        business, user, content = f["business_id"], f["user_id"], f["content"]
        if not business or not user or not content:
            raise ValueError("business_id, user_id and content are required")
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                # Step 3: the conversation (found or created), cached in Redis.
                row = await conn.fetchrow(
                    "SELECT id, stage FROM seed_peer.conversations WHERE business_id = $1"
                    " AND user_id = $2 ORDER BY updated_at DESC LIMIT 1 FOR UPDATE",
                    uuid.UUID(business), user)
                if row is None:
                    conversation_id, stage = uuid.uuid4(), "welcome"
                    await conn.execute(
                        "INSERT INTO seed_peer.conversations (id, business_id, user_id, stage)"
                        " VALUES ($1, $2, $3, $4)", conversation_id, uuid.UUID(business), user,
                        stage)
                else:
                    conversation_id, stage = row["id"], row["stage"]
                llm_call_id = uuid.uuid4()
                await self.redis.set(f"{self.prefix}conv:{conversation_id}",
                                     json.dumps({"stage": stage, "last_updated": time.time()}))
                # Step 4: the stage's template ids, cached in Redis.
                key = f"{self.prefix}stage:{business}:{stage}"
                templates = await self.redis.hgetall(key)
                if not templates:
                    await self.redis.hset(key, mapping={k: v or "" for k, v in
                                                        STAGES[stage].items()})
                # Step 5: the context: history and extracted data, cached in Redis.
                history = await conn.fetch(
                    "SELECT role, content FROM seed_peer.messages WHERE conversation_id = $1"
                    " ORDER BY created_at DESC LIMIT 20", conversation_id)
                lines = "\n".join(f"{r['role']}: {r['content']}" for r in reversed(history))
                extracted = {r["field"]: json.loads(r["value"]) for r in await conn.fetch(
                    "SELECT field, value FROM seed_peer.extracted_data"
                    " WHERE conversation_id = $1", conversation_id)}
                await self.redis.set(f"{self.prefix}context:{conversation_id}",
                                     json.dumps({"stage": stage, "extracted": extracted}))
                # Step 6: stage selection.
                answer = await self.call(
                    conn, conversation_id, llm_call_id, "selection",
                    SELECT_SYSTEM.format(business="Sunny Smile Dental"),
                    SELECT_BODY.format(stage=stage, history=lines, content=content), True)
                try:
                    chosen = json.loads(answer).get("stage")
                except (ValueError, AttributeError):
                    chosen = None
                if chosen in STAGES and chosen != stage:
                    await conn.execute(
                        "UPDATE seed_peer.conversations SET stage = $2 WHERE id = $1",
                        conversation_id, chosen)
                    await conn.execute(
                        "INSERT INTO seed_peer.stage_transitions (conversation_id, from_stage,"
                        " to_stage) VALUES ($1, $2, $3)", conversation_id, stage, chosen)
                    stage = chosen
                    await self.redis.set(f"{self.prefix}conv:{conversation_id}",
                                         json.dumps({"stage": stage,
                                                     "last_updated": time.time()}))
                # Steps 7-8: the new stage's templates; extraction when it has one.
                known = ", ".join(f"{k}={v}" for k, v in sorted(extracted.items()))
                if STAGES[stage]["extraction"]:
                    answer = await self.call(
                        conn, conversation_id, llm_call_id, "extraction", EXTRACT_SYSTEM,
                        EXTRACT_BODY.format(known=known, content=content), True)
                    try:
                        fields = json.loads(answer)
                    except ValueError:
                        fields = {}
                    for k, v in (fields if isinstance(fields, dict) else {}).items():
                        await conn.execute(
                            "INSERT INTO seed_peer.extracted_data (conversation_id, field, value)"
                            " VALUES ($1, $2, $3) ON CONFLICT (conversation_id, field)"
                            " DO UPDATE SET value = EXCLUDED.value",
                            conversation_id, k, json.dumps(v))
                        extracted[k] = v
                    await self.redis.set(f"{self.prefix}data:{conversation_id}",
                                         json.dumps(extracted))
                    known = ", ".join(f"{k}={v}" for k, v in sorted(extracted.items()))
                # Step 9: the response.
                reply = await self.call(
                    conn, conversation_id, llm_call_id, "response",
                    REPLY_SYSTEM.format(business="Sunny Smile Dental", stage=stage),
                    REPLY_BODY.format(history=lines, known=known, content=content), False)
                # Steps 10-11: both messages, the conversation.
                await conn.execute(
                    "INSERT INTO seed_peer.messages (id, conversation_id, role, content,"
                    " message_id, llm_call_id) VALUES ($1, $2, 'user', $3, $4, $5),"
                    " ($6, $2, 'assistant', $7, $4, $5)",
                    uuid.uuid4(), conversation_id, content, f.get("message_id"), llm_call_id,
                    uuid.uuid4(), reply)
                await conn.execute(
                    "UPDATE seed_peer.conversations SET updated_at = now() WHERE id = $1",
                    conversation_id)
            # Step 12: committed; the final state to Redis.
            await self.redis.set(f"{self.prefix}conv:{conversation_id}",
                                 json.dumps({"stage": stage, "last_updated": time.time()}))
        return reply


if __name__ == "__main__":
    asyncio.run(Peer().run())
