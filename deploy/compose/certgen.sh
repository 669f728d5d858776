#!/bin/sh
# docker-compose.yml's certgen one-shot. Runs its arguments (`xdsctl certgen /pki ...`: the
# CA stays in /pki and is reused on the next run), then copies into each service's volume
# only the files that service reads, owned by uid 10001 (the uid every reader runs as).
# So no Envoy can read the CA key, xdscp's key or another Envoy's key.
# Tests run it outside Docker with CERTGEN_ROOT (a directory standing for /) and
# CERTGEN_OWNER="" (keep the caller as owner).
set -eu
root=${CERTGEN_ROOT-}
owner=${CERTGEN_OWNER-10001}

"$@"

give() {
    to=$root$1
    shift
    mkdir -p "$to"
    for name in "$@"; do
        case $name in
            *.key) mode=0400 ;;
            *) mode=0444 ;;
        esac
        # Complete under a temporary name, then renamed: a running xdscp re-reads its files
        # when one is replaced, and must never see one half-written or not yet readable.
        install -m "$mode" "$root/pki/$name" "$to/.$name.new"
        if [ -n "$owner" ]; then chown "$owner:$owner" "$to/.$name.new"; fi
        mv -f "$to/.$name.new" "$to/$name"
    done
}

give /tls/xdscp ca.pem server.pem server.key admin-client.pem admin-client.key
give /tls/xdsctl ca.pem admin-client.pem admin-client.key
give /tls/envoy-web ca.pem node-edge-envoy-web.pem node-edge-envoy-web.key
give /tls/envoy-canary ca.pem canary-edge-envoy-canary.pem canary-edge-envoy-canary.key
