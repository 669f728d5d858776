#!/bin/sh
# docker-compose.replicas.yml's secrets one-shot: what the replicas share, made on the first
# run and kept on later ones (the database volume keeps the password it was set up with, and
# a new admin token would lock out whoever holds the old one). Its argument is the pgpass
# entry's HOST:PORT:DATABASE:USER. Each file goes to its reader's volume only, mode 0400:
#   /secrets/tokens/admin-token, admin-read-token   xdscp's admin tokens (uid 10001)
#   /secrets/db/password                             the database password (postgres, uid 999)
#   /secrets/pgpass/pgpass                           the same password for libpq (uid 10001)
# Tests run it outside Docker with SECRETS_ROOT (a directory standing for /) and
# SECRETS_OWNERS="" (keep the caller as owner).
set -eu
root=${SECRETS_ROOT-}
owners=${SECRETS_OWNERS-yes}
entry=$1  # HOST:PORT:DATABASE:USER

umask 077

# FILE OWNER: a new random value (URL-safe, so no pgpass escaping) unless FILE holds one.
keep_or_make() {
    file=$root$1
    mkdir -p "$(dirname "$file")"
    if [ ! -s "$file" ]; then
        head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$file.new"
        mv -f "$file.new" "$file"
    fi
    own "$file" "$2"
}

own() {
    chmod 0400 "$1"
    if [ -n "$owners" ]; then chown "$2" "$1"; fi
}

keep_or_make /secrets/tokens/admin-token 10001:10001
keep_or_make /secrets/tokens/admin-read-token 10001:10001
keep_or_make /secrets/db/password 999:999

# libpq's password file: HOST:PORT:DATABASE:USER:PASSWORD (it ignores one open to others).
pgpass=$root/secrets/pgpass/pgpass
mkdir -p "$(dirname "$pgpass")"
printf '%s:%s\n' "$entry" "$(cat "$root/secrets/db/password")" >"$pgpass.new"
mv -f "$pgpass.new" "$pgpass"
own "$pgpass" 10001:10001
