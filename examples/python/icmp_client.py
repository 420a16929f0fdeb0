"""A producer and reply consumer for icmp in Python (redis-py), as any third-party client would
write it: XADD a user message to the inbound stream, then read the outbound stream until the
reply to that message arrives, deduplicating on `reply_id` (docs/protocol.md).

    python3 icmp_client.py --redis redis://127.0.0.1:63799/ --user alice "Hello!"

Prints the reply as JSON and exits 0 for `ok`/`fallback`, 1 for an `error` reply, 2 when no
reply came in time.
"""

import argparse
import json
import sys
import time
import uuid

import redis

DEMO_BUSINESS = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001"


def send(client, inbound, business, user, content, message_id=None, conversation_id=None):
    """Puts one message on the inbound stream; returns its message_id."""
    message_id = message_id or str(uuid.uuid4())
    fields = {"business_id": business, "user_id": user, "message_id": message_id, "content": content}
    if conversation_id:
        fields["conversation_id"] = conversation_id
    client.xadd(inbound, fields)
    return message_id


def wait_reply(client, outbound, message_id, user, timeout_s, since="0"):
    """Reads the outbound stream from `since` until the reply to `message_id` of `user` arrives."""
    seen = set()
    deadline = time.monotonic() + timeout_s
    last = since
    while time.monotonic() < deadline:
        for _stream, entries in client.xread({outbound: last}, count=100, block=500) or []:
            for entry_id, raw in entries:
                last = entry_id
                reply = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                if reply.get("message_id") != message_id or reply.get("user_id") != user:
                    continue
                if reply.get("reply_id") in seen:
                    continue  # the same answer published again: already handled
                seen.add(reply.get("reply_id"))
                return reply
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:63799/")
    parser.add_argument("--inbound", default="icmp:inbound")
    parser.add_argument("--outbound", default="icmp:outbound")
    parser.add_argument("--business", default=DEMO_BUSINESS)
    parser.add_argument("--user", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("content")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis)
    # Replies published from now on: remember where the outbound stream ends before sending.
    newest = client.xrevrange(args.outbound, count=1)
    since = newest[0][0] if newest else "0"
    message_id = send(client, args.inbound, args.business, args.user, args.content)
    reply = wait_reply(client, args.outbound, message_id, args.user, args.timeout, since)
    if reply is None:
        print(f"no reply to {message_id} within {args.timeout} s", file=sys.stderr)
        return 2
    print(json.dumps(reply))
    return 1 if reply["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
