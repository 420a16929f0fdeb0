"""A producer and reply consumer for icmp in Python (redis-py), as any third-party client would
write it: XADD a user message to the inbound stream, then read the outbound stream until the
reply to that message arrives, deduplicating on `reply_id` (docs/protocol.md).

    python3 icmp_client.py --redis redis://127.0.0.1:63799/ --user alice "Hello!"

With `--shards N` (the workers' `streams.shards`) the message goes to its user's shard and the
reply is read from that shard's outbound stream (docs/protocol.md, "Shards"); `--print-shard`
prints the shard and its stream names as JSON instead of sending.

A business that streams its replies (`[business.replies] stream = true`) publishes `partial`
entries with the text so far before the final reply; with `--partials` they are rendered on
stderr as they come (each replaces the last: the text so far, not a delta), the way a chat front
end shows typing. Partials are best-effort: the final reply is the one to keep.

The message carries the producer's W3C trace context (docs/protocol.md, "Trace context"): the
current OpenTelemetry span's when the `opentelemetry` package is installed and a span is
current, else a new sampled `traceparent` of our own, printed on stderr. The reply carries the
`traceparent` of icmp's span; the consumer continues the trace from it (a span of its own under
that parent when `opentelemetry` is installed).

Prints the reply as JSON and exits 0 for `ok`/`fallback`, 1 for an `error` reply, 2 when no
reply came in time.
"""

import argparse
import binascii
import hashlib
import json
import secrets
import sys
import time
import uuid

import redis

DEMO_BUSINESS = "7d1f4c9e-2b1a-4e55-9a7c-0c0ffee00001"


def shard_of(business, user, n):
    """The user's shard among n: jump consistent hash of the first 8 bytes (big-endian) of
    SHA-256 over "<business>:<user>", both canonical (docs/protocol.md, "Shards")."""
    if n <= 1:
        return 0
    canonical = f"{uuid.UUID(business.strip())}:{user.strip()}"
    key = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")
    bucket, j = -1, 0
    while j < n:
        bucket = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_tag(s, n):
    """Shard s's hash tag: the first "{s}of{n}-{j}" whose Redis Cluster slot (CRC16/XMODEM
    modulo 16384, binascii.crc_hqx) is in the middle half of the s-th of n equal slot ranges."""
    lo, hi = (4 * s + 1) * 16384 // (4 * n), (4 * s + 3) * 16384 // (4 * n)
    j = 0
    while not lo <= binascii.crc_hqx(f"{s}of{n}-{j}".encode(), 0) % 16384 < hi:
        j += 1
    return f"{s}of{n}-{j}"


def shard_names(s, n, inbound, outbound, reply_prefix):
    """The inbound and outbound streams and the reply_to prefix of shard s of n."""
    if n <= 1:
        return inbound, outbound, reply_prefix
    tag = shard_tag(s, n)
    return f"{inbound}:{{{tag}}}", f"{outbound}:{{{tag}}}", f"{reply_prefix}{{{tag}}}:"


def producer_trace_context():
    """The W3C trace context to send: OpenTelemetry's current span's when the package is installed
    and a span is current, else a new sampled traceparent (version 00, random trace and span ids)."""
    try:
        from opentelemetry import propagate

        carrier = {}
        propagate.inject(carrier)
        if "traceparent" in carrier:
            return {k: v for k, v in carrier.items() if k in ("traceparent", "tracestate")}
    except ImportError:
        pass
    return {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}


def continue_trace(reply):
    """The consumer's side: a span under the reply's traceparent (with OpenTelemetry installed)."""
    if "traceparent" not in reply:
        return
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return
    parent = propagate.extract({k: reply[k] for k in ("traceparent", "tracestate") if k in reply})
    with trace.get_tracer("icmp_client").start_as_current_span("receive reply", context=parent):
        pass


def send(client, inbound, business, user, content, message_id=None, conversation_id=None,
         trace_context=None):
    """Puts one message on the inbound stream; returns its message_id."""
    message_id = message_id or str(uuid.uuid4())
    fields = {"business_id": business, "user_id": user, "message_id": message_id, "content": content}
    if conversation_id:
        fields["conversation_id"] = conversation_id
    fields.update(trace_context or {})
    client.xadd(inbound, fields)
    return message_id


def wait_reply(client, outbound, message_id, user, timeout_s, since="0", on_partial=None):
    """Reads the outbound stream from `since` until the reply to `message_id` of `user` arrives.
    `on_partial(text, sequence)` is called with each partial of that reply before it."""
    seen = set()
    sequence = 0
    deadline = time.monotonic() + timeout_s
    last = since
    while time.monotonic() < deadline:
        for _stream, entries in client.xread({outbound: last}, count=100, block=500) or []:
            for entry_id, raw in entries:
                last = entry_id
                reply = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
                if reply.get("message_id") != message_id or reply.get("user_id") != user:
                    continue
                if reply.get("status") == "partial":
                    # The text so far; an older one (a late or restarted stream) is skipped.
                    n = int(reply.get("sequence", "0"))
                    if on_partial and n > sequence:
                        sequence = n
                        on_partial(reply.get("content", ""), n)
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
    parser.add_argument("--reply-prefix", default="icmp:reply:")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--print-shard", action="store_true")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--partials", action="store_true",
                        help="render partial replies on stderr as they arrive")
    parser.add_argument("content", nargs="?", default="")
    args = parser.parse_args()

    s = shard_of(args.business, args.user, args.shards)
    args.inbound, args.outbound, reply_prefix = shard_names(
        s, args.shards, args.inbound, args.outbound, args.reply_prefix
    )
    if args.print_shard:
        print(json.dumps({"shard": s, "inbound": args.inbound, "outbound": args.outbound,
                          "reply_prefix": reply_prefix}))
        return 0
    client = redis.Redis.from_url(args.redis)
    # Replies published from now on: remember where the outbound stream ends before sending.
    newest = client.xrevrange(args.outbound, count=1)
    since = newest[0][0] if newest else "0"
    trace_context = producer_trace_context()
    print(f"traceparent {trace_context['traceparent']}", file=sys.stderr, flush=True)
    message_id = send(client, args.inbound, args.business, args.user, args.content,
                      trace_context=trace_context)
    shown = []

    def show(text, n):
        # One line per partial, so that a test (or a log) can count them; a terminal front end
        # would redraw the line instead.
        shown.append(n)
        print(f"partial {n}: {text}", file=sys.stderr, flush=True)

    reply = wait_reply(client, args.outbound, message_id, args.user, args.timeout, since,
                       on_partial=show if args.partials else None)
    if reply is None:
        print(f"no reply to {message_id} within {args.timeout} s", file=sys.stderr)
        return 2
    continue_trace(reply)
    print(json.dumps(reply))
    return 1 if reply["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
