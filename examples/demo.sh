#!/usr/bin/env bash
# The whole node in one script: a switchboard, a web server that registers by labels
# (it never binds a port), an ingress that turns TCP connections on a local port into
# switchboard connections, and curl fetching a page through it. Then the way out:
# a DNS resolver and an egress, so `flower cat` reaches localhost:PORT by name.
#
#   examples/demo.sh              # builds in release mode, port chosen by the kernel
#   PORT=8080 examples/demo.sh    # a fixed port
#
# FLOWER and HELLO_WEB may point at prebuilt binaries (the tests do that).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${FLOWER:-}" || -z "${HELLO_WEB:-}" ]]; then
    cargo build --release --quiet --bin flower --example hello_web
    FLOWER=$PWD/target/release/flower
    HELLO_WEB=$PWD/target/release/examples/hello_web
fi
command -v curl >/dev/null || { echo "demo: needs curl (apt-get install -y curl)" >&2; exit 1; }

work=$(mktemp -d)
cleanup() {
    local status=$?
    # Stop everything this script started. The scratch directory goes only after a
    # success: after a failure its logs say why (a busy port, a missing binary).
    kill $(jobs -p) 2>/dev/null || true
    wait 2>/dev/null || true
    if ((status == 0)); then
        rm -rf "$work"
    else
        echo "demo: failed; the logs are in $work:" >&2
        for log in "$work"/*.log; do
            [[ -s $log ]] && { echo "--- $log" >&2; tail -n 20 "$log" >&2; }
        done
    fi
}
trap cleanup EXIT
export FLOWER_SWITCHBOARD=$work/switchboard
export RUST_LOG=${RUST_LOG:-info}

if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
wait_for() { # wait_for DESCRIPTION COMMAND...: up to 10 s
    for _ in $(seq 100); do "${@:2}" && return 0; sleep 0.1; done
    echo "demo: gave up waiting for $1" >&2; exit 1
}

step "1. The switchboard, at $FLOWER_SWITCHBOARD"
"$FLOWER" switchboard 2>"$work/switchboard.log" &
wait_for "the switchboard" test -S "$FLOWER_SWITCHBOARD"

step "2. A web server registers as app=web net=local (no bind, no port)"
"$HELLO_WEB" app=web net=local 2>"$work/web.log" &
wait_for "the web server" grep -q registered "$work/web.log"
"$FLOWER" ls

step "3. An ingress on 127.0.0.1:${PORT:-0} forwards to app=web net=local"
# --ready-fd writes the bound address once listening; an ingress that cannot listen
# closes the FIFO without a line, and `read` fails at once.
mkfifo "$work/ready"
"$FLOWER" ingress accept "127.0.0.1:${PORT:-0}" app=web net=local --ready-fd 3 \
    3>"$work/ready" 2>"$work/ingress.log" &
read -r address <"$work/ready" || { echo "demo: the ingress did not start" >&2; exit 1; }
echo "listening on $address"

step "4. curl http://$address/ — the server sees who connected, as labels"
curl --silent --show-error --max-time 10 "http://$address/"

step "5. The way out: a DNS resolver and an egress, both as net=out"
"$FLOWER" egress resolve net=out 2>"$work/resolve.log" &
"$FLOWER" egress connect --allow 127.0.0.0/8 net=out 2>"$work/egress.log" &
wait_for "the egress" sh -c '"$0" ls net=out | grep -q out' "$FLOWER"
wait_for "the resolver" grep -q 'resolver registered' "$work/resolve.log"
port=${address##*:}
echo "flower cat server_hostname=localhost server_service=$port"
echo "  (resolver: localhost → 127.0.0.1; egress: TCP connect; ingress: back to the web server)"
printf 'GET /by-name HTTP/1.0\r\n\r\n' |
    "$FLOWER" cat server_hostname=localhost server_service="$port" 2>/dev/null |
    tr -d '\r'

step "Done. Logs were in $work (removed on success)."
