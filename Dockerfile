# syntax=docker/dockerfile:1
# The icmp worker image: `docker build -t icmp .`; runs `icmp worker` with the defaults compiled
# into the binary and `ICMP__…` variables (see docs/operations.md).

FROM rust:1.95-bookworm AS build
WORKDIR /build
# Dependencies first, in a layer of their own that only Cargo.toml and Cargo.lock invalidate.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/integration \
    && echo 'fn main() {}' > src/main.rs \
    && echo '' > src/lib.rs \
    && touch tests/integration/main.rs \
    && cargo build --release --locked --no-default-features --features jemalloc \
    && rm -rf src target/release/icmp target/release/deps/icmp-* target/release/deps/libicmp-*
COPY config ./config
COPY sql ./sql
COPY src ./src
# Without the `bench` feature: the benchmark is no part of a worker.
RUN cargo build --release --locked --no-default-features --features jemalloc --bin icmp

FROM debian:bookworm-slim
# ca-certificates: TLS to managed PostgreSQL, Redis and LLM endpoints.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin icmp
COPY --from=build /build/target/release/icmp /usr/local/bin/icmp
COPY config/businesses /usr/share/icmp/businesses
USER 10001
ENV ICMP__TELEMETRY__LISTEN=0.0.0.0:9464 \
    ICMP__TELEMETRY__LOG_FORMAT=json
EXPOSE 9464
# /healthz over plain bash (the slim image has no curl).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["icmp"]
CMD ["worker"]
