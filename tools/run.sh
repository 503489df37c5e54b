#!/usr/bin/env bash
# `make run`: the debug server and the exporter together, so records scroll
# by. Ctrl-C stops both (each drains and prints its totals).
#   FREQUENCY=5s  time between polls      FORMAT=text  text | json
#   PORT=13000    UDP port between them   XTCP_ARGS=   extra xtcp flags
#   PROM=127.0.0.1:9000  metrics and /healthz (the exporter prints the URL)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
port=${PORT:-13000}

"$bin/xtcp-debug-server" --listen "127.0.0.1:$port" --format "${FORMAT:-text}" &
server=$!
sleep 0.2
if ! kill -0 "$server" 2>/dev/null; then
    wait "$server" || exit 1
fi
# shellcheck disable=SC2086 # XTCP_ARGS is a list of flags
"$bin/xtcp" --dest "udp:127.0.0.1:$port" --frequency "${FREQUENCY:-5s}" \
    --prom-listen "${PROM:-127.0.0.1:9000}" -v ${XTCP_ARGS:-} &
exporter=$!

# Ctrl-C reaches both through the terminal's process group; a TERM sent to
# this script alone is passed on. Either way, wait for both to finish.
trap 'kill -TERM "$exporter" "$server" 2>/dev/null || true' TERM
trap ':' INT
# `wait` returns early when a trapped signal arrives: wait until it exited.
status=0
while kill -0 "$exporter" 2>/dev/null; do
    wait "$exporter" && status=0 || status=$?
done
kill -TERM "$server" 2>/dev/null || true
wait "$server" || true
exit "$status"
