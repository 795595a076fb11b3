#!/usr/bin/env bash
# Make the services the tests and a local deployment need answer on this machine:
#   PostgreSQL  127.0.0.1:5432  role/database oncelery (password oncelery, LOGIN CREATEDB)
#   Redis       127.0.0.1:6379  no persistence (tests purge it; DESIGN.md says Postgres decides)
#   RabbitMQ    127.0.0.1:5672  guest/guest (allowed from localhost only)
# Idempotent: a service that already answers is left alone, so a second run takes ~1 s.
# Installing or starting anything needs root (this is written for Debian 12 and CI containers,
# where nothing runs systemd); checking does not.
set -euo pipefail

PG_PORT=5432
REDIS_PORT=6379
AMQP_PORT=5672
DB_NAME=oncelery
DB_USER=oncelery
DB_PASSWORD=oncelery
LOG_DIR=${TMPDIR:-/tmp}/oncelery-services
# One RabbitMQ virtual host per parallel test process (gw0, gw1, … of pytest-xdist).
TEST_VHOSTS=(oncelery-test-gw0 oncelery-test-gw1 oncelery-test-gw2 oncelery-test-gw3)

say() { printf 'services: %s\n' "$*" >&2; }
die() {
    printf 'services: error: %s\n' "$*" >&2
    exit 1
}
is_root() { [[ $(id -u) == 0 ]]; }
need_root() { is_root || die "$1 needs root (run scripts/services.sh as root, or start it yourself)"; }

# wait_for SECONDS COMMAND...: poll COMMAND every half second until it succeeds.
wait_for() {
    local seconds=$1
    shift
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# --- packages ------------------------------------------------------------------------------

install_missing_packages() {
    local package missing=()
    for package in postgresql redis-server rabbitmq-server chromium; do
        # `dpkg -s` also knows removed-but-not-purged packages: ask for the installed state.
        dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed' ||
            missing+=("$package")
    done
    if ((${#missing[@]} == 0)); then
        return
    fi
    need_root "installing ${missing[*]}"
    say "apt: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- PostgreSQL ----------------------------------------------------------------------------

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

# psql as the postgres superuser over the local socket (peer auth); SQL on stdin. Run from /
# because postgres may not be allowed into the caller's working directory.
psql_admin() {
    (cd / && su postgres -s /bin/sh -c "psql -X -q -v ON_ERROR_STOP=1 -p $PG_PORT -tA")
}

# The cluster on our port: "VERSION NAME STATUS" from pg_lsclusters, else the newest installed
# version with the conventional name "main".
pg_cluster() {
    local line
    line=$(pg_lsclusters --no-header 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4; exit }')
    if [[ -n $line ]]; then
        echo "$line"
        return
    fi
    local version
    version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -n 1)
    echo "${version:-15} main absent"
}

start_postgres() {
    need_root "starting PostgreSQL"
    local version name status
    read -r version name status < <(pg_cluster)
    if [[ $status == absent ]]; then
        say "postgres: creating cluster $version/$name on port $PG_PORT"
        pg_createcluster --port "$PG_PORT" "$version" "$name" >/dev/null
        status=down
    fi
    # A cluster that says "online" but does not answer yet is still starting: just wait.
    if [[ $status != online ]]; then
        say "postgres: starting cluster $version/$name"
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start ||
            die "postgres: pg_ctlcluster $version $name start failed; see /var/log/postgresql/postgresql-$version-$name.log"
    fi
    wait_for 60 pg_ready ||
        die "postgres: not accepting connections on 127.0.0.1:$PG_PORT after 60 s; see /var/log/postgresql/postgresql-$version-$name.log"
}

# The fast path: the application's own login works and may create databases (the tests clone
# a template per test), so there is nothing to do and no need for root.
app_role_ready() {
    local createdb
    createdb=$(PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -h 127.0.0.1 -p "$PG_PORT" \
        -U "$DB_USER" -d "$DB_NAME" -tAc "SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user" 2>/dev/null) ||
        return 1
    [[ $createdb == t ]]
}

ensure_role_and_database() {
    if app_role_ready; then
        return
    fi
    need_root "creating the $DB_USER role and database"
    if [[ -z $(psql_admin <<<"SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'") ]]; then
        say "postgres: creating role $DB_USER"
        psql_admin <<<"CREATE ROLE $DB_USER WITH LOGIN CREATEDB NOSUPERUSER PASSWORD '$DB_PASSWORD'"
    else
        # It exists but its login failed or it cannot create databases: make it what we expect.
        say "postgres: resetting role $DB_USER (LOGIN CREATEDB, password $DB_PASSWORD)"
        psql_admin <<<"ALTER ROLE $DB_USER WITH LOGIN CREATEDB PASSWORD '$DB_PASSWORD'"
    fi
    if [[ -z $(psql_admin <<<"SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'") ]]; then
        say "postgres: creating database $DB_NAME"
        psql_admin <<<"CREATE DATABASE $DB_NAME OWNER $DB_USER"
    fi
    app_role_ready || die "postgres: cannot log in as $DB_USER to $DB_NAME on 127.0.0.1:$PG_PORT"
}

# pg_stat_statements counts the statements `oncelery bench` reports per order. Loading it needs
# a restart, done once; the extension is then created where the bench reads it. Without root,
# a missing extension is only reported: the bench then shows statements as unknown.
stat_statements_ready() {
    local database
    for database in "$DB_NAME" postgres; do
        PGPASSWORD=$DB_PASSWORD PGCONNECT_TIMEOUT=5 psql -X -h 127.0.0.1 -p "$PG_PORT" -U "$DB_USER" \
            -d "$database" -tAc "SELECT 1 FROM pg_stat_statements LIMIT 1" >/dev/null 2>&1 || return 1
    done
}

ensure_pg_stat_statements() {
    if stat_statements_ready; then
        return
    fi
    if ! is_root; then
        say "postgres: pg_stat_statements is not enabled (needs root); oncelery bench cannot count statements"
        return
    fi
    local loaded version name _status
    loaded=$(psql_admin <<<"SHOW shared_preload_libraries")
    if [[ ,${loaded// /}, != *,pg_stat_statements,* ]]; then
        say "postgres: loading pg_stat_statements (restarting the cluster)"
        psql_admin <<<"ALTER SYSTEM SET shared_preload_libraries = '${loaded:+$loaded,}pg_stat_statements'"
        read -r version name _status < <(pg_cluster)
        pg_ctlcluster --skip-systemctl-redirect "$version" "$name" restart ||
            die "postgres: restart of $version/$name failed; see /var/log/postgresql/postgresql-$version-$name.log"
        wait_for 60 pg_ready || die "postgres: not accepting connections after the restart"
    fi
    local database
    for database in "$DB_NAME" postgres; do
        (cd / && su postgres -s /bin/sh -c "psql -X -q -v ON_ERROR_STOP=1 -p $PG_PORT -d $database" \
            <<<"CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    done
    say "postgres: pg_stat_statements enabled"
}

ensure_postgres() {
    if pg_ready; then
        ensure_role_and_database
        say "postgres: up on 127.0.0.1:$PG_PORT (already running)"
        return
    fi
    start_postgres
    ensure_role_and_database
    say "postgres: up on 127.0.0.1:$PG_PORT (started)"
}

# --- Redis ---------------------------------------------------------------------------------

redis_ready() { [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

ensure_redis() {
    if redis_ready; then
        say "redis: up on 127.0.0.1:$REDIS_PORT (already running)"
        return
    fi
    need_root "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        >/dev/null || die "redis: redis-server failed to start"
    wait_for 20 redis_ready ||
        die "redis: no PONG from 127.0.0.1:$REDIS_PORT after 20 s (is something else on the port?)"
    say "redis: up on 127.0.0.1:$REDIS_PORT (started)"
}

# --- RabbitMQ ------------------------------------------------------------------------------

# rabbitmqctl only runs as root or rabbitmq (Debian's wrapper); anyone else can only see
# whether the AMQP port is open.
rabbit_ready() {
    if is_root; then
        rabbitmq-diagnostics -q ping >/dev/null 2>&1
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$AMQP_PORT") 2>/dev/null
    fi
}

ensure_rabbitmq() {
    if rabbit_ready; then
        say "rabbitmq: up on 127.0.0.1:$AMQP_PORT (already running)"
        return
    fi
    need_root "starting RabbitMQ"
    mkdir -p "$LOG_DIR"
    say "rabbitmq: starting (log: $LOG_DIR/rabbitmq-start.log)"
    rabbitmq-server -detached >"$LOG_DIR/rabbitmq-start.log" 2>&1 ||
        die "rabbitmq: rabbitmq-server -detached failed; see $LOG_DIR/rabbitmq-start.log"
    # await_startup exits 69 while the Erlang node is not reachable yet: keep asking.
    local deadline=$((SECONDS + 90))
    until rabbitmqctl -q --timeout 10 await_startup >>"$LOG_DIR/rabbitmq-start.log" 2>&1; do
        ((SECONDS < deadline)) ||
            die "rabbitmq: not started after 90 s; see $LOG_DIR/rabbitmq-start.log and /var/log/rabbitmq/"
        sleep 1
    done
    say "rabbitmq: up on 127.0.0.1:$AMQP_PORT (started)"
}

# The tests run in parallel processes (pytest-xdist), each on a virtual host of its own.
ensure_test_vhosts() {
    is_root || return 0
    local existing vhost
    existing=$(rabbitmqctl -q list_vhosts name 2>/dev/null)
    for vhost in "${TEST_VHOSTS[@]}"; do
        if ! grep -qx "$vhost" <<<"$existing"; then
            rabbitmqctl -q add_vhost "$vhost" >/dev/null
            rabbitmqctl -q set_permissions -p "$vhost" guest ".*" ".*" ".*" >/dev/null
            say "rabbitmq: virtual host $vhost created for the tests"
        fi
    done
}

install_missing_packages
ensure_postgres
ensure_pg_stat_statements
ensure_redis
ensure_rabbitmq
ensure_test_vhosts
