#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for twopc's demo and tests, installing only what is
# missing:
#   - the MariaDB server binaries (mariadbd, mariadb-install-db), from apt. The system service is
#     left stopped and disabled: the tests start throwaway servers of their own;
#   - the Galera 4 provider (/usr/lib/galera/libgalera_smm.so, package galera-4) and rsync, which
#     its state transfer runs: the replicated decision-log store's tests start a throwaway
#     3-node cluster (twopc/testing/playground/galera.py). rsync's service is left disabled;
#   - libfaketime (package libfaketime), with which the group's chaos run slows a member's clock;
#   - the PostgreSQL server binaries (initdb, postgres in /usr/lib/postgresql/<version>/bin, and
#     the postgres user the tests run them as), from apt (postgresql), its service likewise left
#     stopped and disabled: the SQL decision log's tests start throwaway servers too;
#   - Redis (redis-server) and RabbitMQ (rabbitmq-server, with Erlang), from apt, their services
#     left stopped and disabled: twopc flash-sale and its tests start throwaway instances;
#   - Python >= 3.11 with venv support (python3-venv);
#   - .venv in the repository root, with pip upgraded and `pip install -e '.[dev]'`.
# Safe to run again: a second run finds everything in place and changes nothing. The editable
# install is redone only when pyproject.toml changed since the last run.
# Environment: PYTHON names the interpreter to build .venv with (default: the first python3,
# python3.13, python3.12 or python3.11 on PATH that is at least 3.11).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.twopc-setup-stamp"
policy=/usr/sbin/policy-rc.d
policy_backup="$policy.twopc-setup-backup"

say() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

apt_updated=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; install these yourself: $*"
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update
        apt_updated=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

# Where a binary is: PATH first, then the sbin/bin directories Debian uses (often not on PATH for
# ordinary users). Prints nothing and fails when it is nowhere.
find_binary() {
    local name="$1" dir
    if command -v "$name" 2>/dev/null; then
        return 0
    fi
    for dir in /usr/sbin /usr/bin; do
        if [ -x "$dir/$name" ]; then
            printf '%s\n' "$dir/$name"
            return 0
        fi
    done
    return 1
}

have_mariadb() {
    find_binary mariadbd >/dev/null && find_binary mariadb-install-db >/dev/null
}

galera_provider=/usr/lib/galera/libgalera_smm.so

# The Debian packages of what the Galera tests need and this machine lacks, one a line.
missing_galera_packages() {
    [ -f "$galera_provider" ] || echo galera-4
    command -v rsync >/dev/null 2>&1 || echo rsync
}

have_postgres() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

restore_policy() {
    if [ -e "$policy_backup" ]; then
        as_root mv -f "$policy_backup" "$policy"
    else
        as_root rm -f "$policy"
    fi
}

# apt-get install "$@" with no service started, then each service in $SERVICES disabled and
# stopped (systemd machines).
install_without_services() {
    # Package scripts start services through invoke-rc.d / deb-systemd-invoke, which ask
    # policy-rc.d first: exit code 101 means "do not start anything". Keep whatever policy the
    # machine had and put it back afterwards.
    if [ -e "$policy" ]; then
        as_root cp -p "$policy" "$policy_backup"
    fi
    trap restore_policy EXIT
    printf '#!/bin/sh\n# deploy/setup.sh: no service starts while packages install.\nexit 101\n' |
        as_root tee "$policy" >/dev/null
    as_root chmod 755 "$policy"

    apt_install "$@"

    restore_policy
    trap - EXIT
    # policy-rc.d stops the start but not the enabling; on a systemd machine undo that too (the
    # service was not running before: there was no server to run).
    local service
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        for service in $SERVICES; do
            say "systemctl disable --now $service (the tests run their own servers)"
            as_root systemctl disable --now "$service" >/dev/null 2>&1 || true
        done
    fi
}

python_ok() { # at least 3.11
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1
}

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

# --- MariaDB ------------------------------------------------------------------------------------
if have_mariadb; then
    say "MariaDB: found $(find_binary mariadbd) and $(find_binary mariadb-install-db)"
else
    say "MariaDB: mariadbd or mariadb-install-db missing; installing mariadb-server"
    SERVICES="mariadb.service" install_without_services mariadb-server
    have_mariadb || die "mariadb-server installed, yet mariadbd or mariadb-install-db is missing"
    say "MariaDB: installed $(find_binary mariadbd) and $(find_binary mariadb-install-db)"
fi

# --- Galera (the replicated decision-log store's tests) -----------------------------------------
galera_missing="$(missing_galera_packages)"
if [ -z "$galera_missing" ]; then
    say "Galera: found $galera_provider and $(command -v rsync)"
else
    # shellcheck disable=SC2086  # one package name a word
    say "Galera: installing" $galera_missing
    # shellcheck disable=SC2086
    SERVICES="rsync.service" install_without_services $galera_missing
    [ -z "$(missing_galera_packages)" ] ||
        die "galera-4 and rsync installed, yet $galera_provider or rsync is missing"
    say "Galera: installed $galera_provider and $(command -v rsync)"
fi

# --- libfaketime (the chaos run's slowed member clock) -----------------------------------------
if compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null; then
    say "libfaketime: found"
else
    say "libfaketime: missing; installing libfaketime"
    apt_install libfaketime
    compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null ||
        die "libfaketime installed, yet no libfaketimeMT.so.1 under /usr/lib/*/faketime"
fi

# --- PostgreSQL (the SQL decision log's tests and benchmark) -----------------------------------
if pg_bin="$(have_postgres)"; then
    say "PostgreSQL: found $pg_bin"
else
    say "PostgreSQL: initdb or postgres missing; installing postgresql"
    SERVICES="postgresql.service" install_without_services postgresql
    pg_bin="$(have_postgres)" || die "postgresql installed, yet initdb or postgres is missing"
    # The package also creates a cluster "main" with a unit of its own: never started here
    # (policy-rc.d), and not to be started at boot either.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        pg_unit="postgresql@$(basename "$(dirname "$pg_bin")")-main.service"
        say "systemctl disable --now $pg_unit"
        as_root systemctl disable --now "$pg_unit" >/dev/null 2>&1 || true
    fi
    say "PostgreSQL: installed $pg_bin"
fi
id postgres >/dev/null 2>&1 || die "no postgres user (the postgresql package creates it)"

# --- Redis and RabbitMQ (twopc flash-sale: the stock gate, the message queue) ------------------
if command -v redis-server >/dev/null 2>&1; then
    say "Redis: found $(command -v redis-server)"
else
    say "Redis: redis-server missing; installing redis-server"
    SERVICES="redis-server.service" install_without_services redis-server
    command -v redis-server >/dev/null 2>&1 || die "redis-server installed, yet not on PATH"
fi
if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    say "RabbitMQ: found /usr/lib/rabbitmq/bin/rabbitmq-server"
else
    say "RabbitMQ: rabbitmq-server missing; installing rabbitmq-server"
    SERVICES="rabbitmq-server.service" install_without_services rabbitmq-server
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] ||
        die "rabbitmq-server installed, yet /usr/lib/rabbitmq/bin/rabbitmq-server is missing"
fi

# --- Python -------------------------------------------------------------------------------------
if ! python="$(find_python)"; then
    say "Python: no python >= 3.11 found; installing python3 and python3-venv"
    apt_install python3 python3-venv
    python="$(find_python)" || die "python3 from apt is older than 3.11; install Python >= 3.11"
fi
say "Python: $python ($("$python" -c 'import sys; print(sys.version.split()[0])'))"

if [ ! -x "$venv/bin/python" ]; then
    # Debian moves ensurepip, which venv needs, into python3.X-venv.
    if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        if [ "$(command -v python3 || true)" = "$python" ]; then
            apt_install python3-venv
        else
            apt_install "python$version-venv"
        fi
    fi
    say "creating $venv"
    "$python" -m venv "$venv"
    rm -f "$stamp"
else
    say "virtualenv: $venv exists"
fi

# --- the project --------------------------------------------------------------------------------
wanted="$(sha256sum "$repo_root/pyproject.toml" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    say "dependencies: up to date (pyproject.toml unchanged since the last install)"
else
    say "upgrading pip"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    say "pip install -e '.[dev]'"
    (cd "$repo_root" && "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -e '.[dev]')
    printf '%s\n' "$wanted" >"$stamp"
fi

say "done; run the tests with deploy/test.sh"
