#!/bin/sh
# Usage: require-secrets.sh VAR... -- COMMAND...
# Starts COMMAND only when every VAR is set in the environment (from infra/.env) and is not the value
# infra/.env.example ships: a server must never run with a password everybody knows.
set -eu
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  name="$1"; shift
  eval "value=\${$name:-}"
  case "$value" in
    ""|*change-me*) echo "error: infra/.env: $name is unset or still the example's value; set a real one" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
exec "$@"
