#!/bin/bash
# Container health check of the tokenfan image (the image's HEALTHCHECK).
# Finds which tokenfan binary the container runs and asks it over plain HTTP on loopback:
#   tokenfan-edge       GET /healthz on the admin port (TOKENFAN_EDGE_ADMIN_LISTEN, default 9465)
#   tokenfan-generator  GET /metrics on the port of TOKENFAN_GENERATOR_METRICS_LISTEN (9464)
#   anything else       healthy (tokenfan-loadgen is a batch job)
# Uses bash's /dev/tcp: the runtime image has no curl or wget.
set -u

running=""
for cmdline in /proc/[0-9]*/cmdline; do
  argv0=$(tr '\0' '\n' <"$cmdline" 2>/dev/null | head -n1)
  case "${argv0##*/}" in
    tokenfan-edge | tokenfan-generator) running=${argv0##*/}; break ;;
  esac
done

case "$running" in
  tokenfan-edge)
    listen=${TOKENFAN_EDGE_ADMIN_LISTEN:-127.0.0.1:9465}
    port=${listen##*:}; path=/healthz ;;
  tokenfan-generator)
    listen=${TOKENFAN_GENERATOR_METRICS_LISTEN:-0.0.0.0:9464}
    port=${listen##*:}; path=/metrics ;;
  *) exit 0 ;;
esac

exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 3 status <&3 || exit 1
case "$status" in
  "HTTP/1.1 200"*) exit 0 ;;
  *) echo "$running: GET $path answered: $status" >&2; exit 1 ;;
esac
