#!/usr/bin/env bash
# The one entrypoint of every container of a curate deployment (docker/compose.yaml) and the
# script the multi-node tests start their nodes with (tests/integration/cluster/), so what the
# tests run is what a deployment runs.
#
#   entrypoint.sh head   [ray start flags]    Ray head: GCS and the dashboard (job submission)
#   entrypoint.sh worker [ray start flags]    a Ray node joining CURATE_HEAD_ADDRESS (host:port)
#   entrypoint.sh api    [curate serve flags] the REST service; jobs go to CURATE_RAY_ADDRESS
#   entrypoint.sh curate ARGS...              any curate command, e.g. a driver: curate run ...
#
# Nodes run in the foreground (ray start --block): the container, or the test, owns the node,
# and stopping the process (SIGTERM) stops the node's processes with it.
#
# Environment:
#   CURATE_NODE_CPUS, CURATE_NODE_GPUS   resources the node offers (default: what Ray detects;
#                                        a head usually offers CPU 0 so tasks go to workers)
#   CURATE_NODE_RESOURCES                custom resources as JSON, e.g. '{"spot": 1}'
#   CURATE_RAY_PORT (6379), CURATE_DASHBOARD_PORT (8265), CURATE_DASHBOARD_HOST (0.0.0.0)
#   RAY_AUTH_MODE (token), RAY_AUTH_TOKEN   Ray 2.6x token authentication: every node, driver
#                                        and the api must carry the head's token
set -euo pipefail

role="${1:-}"
[[ $# -gt 0 ]] && shift
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

node=(--disable-usage-stats)
[[ -n "${CURATE_NODE_CPUS:-}" ]] && node+=(--num-cpus "$CURATE_NODE_CPUS")
[[ -n "${CURATE_NODE_GPUS:-}" ]] && node+=(--num-gpus "$CURATE_NODE_GPUS")
[[ -n "${CURATE_NODE_RESOURCES:-}" ]] && node+=(--resources "$CURATE_NODE_RESOURCES")

case "$role" in
  head)
    exec ray start --head --block "${node[@]}" \
      --port "${CURATE_RAY_PORT:-6379}" \
      --include-dashboard true \
      --dashboard-host "${CURATE_DASHBOARD_HOST:-0.0.0.0}" \
      --dashboard-port "${CURATE_DASHBOARD_PORT:-8265}" "$@"
    ;;
  worker)
    if [[ -z "${CURATE_HEAD_ADDRESS:-}" ]]; then
      echo "entrypoint.sh worker: set CURATE_HEAD_ADDRESS to the head's host:port" >&2
      exit 2
    fi
    exec ray start --address "$CURATE_HEAD_ADDRESS" --block "${node[@]}" "$@"
    ;;
  api)
    exec curate serve --host "${CURATE_API_HOST:-0.0.0.0}" --port "${CURATE_API_PORT:-8000}" "$@"
    ;;
  curate)
    exec curate "$@"
    ;;
  *)
    echo "usage: entrypoint.sh head|worker|api|curate [args...] (got '${role}')" >&2
    exit 2
    ;;
esac
