#!/usr/bin/env bash
# The cace-server HTTP API from the shell, with curl only.
#
#   clients/examples/curl.sh [URL]        (default http://127.0.0.1:8000)
#
# Set CACE_SERVER_TOKEN when the server requires a bearer token. Every call below
# fails loudly (curl --fail-with-body) and prints the server's JSON reply.
set -euo pipefail

URL="${1:-http://127.0.0.1:8000}"
AUTH=()
if [[ -n "${CACE_SERVER_TOKEN:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${CACE_SERVER_TOKEN}")
fi
CURL=(curl --silent --show-error --fail-with-body --max-time 60 "${AUTH[@]}")

echo "# liveness (never needs a token) and readiness"
curl --silent --show-error --fail-with-body --max-time 10 "$URL/healthz"; echo
"${CURL[@]}" "$URL/readyz"; echo

echo "# the models this server serves"
"${CURL[@]}" "$URL/v1/models"; echo

echo "# one water molecule (non-periodic): energy (eV) and forces (eV/Å)"
"${CURL[@]}" -H 'Content-Type: application/json' "$URL/v1/calculate" -d '{
  "symbols": ["O", "H", "H"],
  "positions": [[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]],
  "properties": ["energy", "forces"]
}'; echo

echo "# the same molecule in a periodic box: stress in eV/Å^3 (Voigt xx yy zz yz xz xy)"
"${CURL[@]}" -H 'Content-Type: application/json' "$URL/v1/calculate" -d '{
  "numbers": [8, 1, 1],
  "positions": [[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]],
  "cell": [8.0, 8.0, 8.0],
  "pbc": true
}'; echo

echo "# two structures in one request, evaluated together"
"${CURL[@]}" -H 'Content-Type: application/json' "$URL/v1/calculate/batch" -d '{
  "structures": [
    {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]},
    {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0], [0.99, 0, 0], [-0.25, 0.95, 0]]}
  ],
  "properties": ["energy"]
}'; echo

echo "# a bad request: the reply names the field (structures or positions), HTTP 422"
curl --silent --show-error --max-time 10 "${AUTH[@]}" -H 'Content-Type: application/json' \
  -w '\nHTTP %{http_code}\n' "$URL/v1/calculate" \
  -d '{"symbols": ["O", "H"], "positions": [[0, 0, 0], [0, 0, 0.01]]}'

echo "# i-PI runs attached through the API (POST /v1/ipi/connections to add one)"
"${CURL[@]}" "$URL/v1/ipi/connections"; echo
# To attach a running i-PI (listening on unix socket /tmp/ipi_water, 64 waters; the
# server must be started with --ipi-attach):
#   curl "${AUTH[@]}" -H 'Content-Type: application/json' "$URL/v1/ipi/connections" \
#     -d '{"address": "unix:water", "clients": 4, "symbols": ["O","H","H", ...]}'
# and to detach it:  curl -X DELETE "${AUTH[@]}" "$URL/v1/ipi/connections/g1"

echo "# Prometheus metrics (first lines)"
# (read whole first: grep -m stops reading early, and curl would fail writing the rest)
metrics=$("${CURL[@]}" "$URL/metrics")
grep -m 5 -E '^cace_(engine_requests|http_requests)_total' <<<"$metrics"
