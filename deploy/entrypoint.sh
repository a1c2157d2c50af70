#!/usr/bin/env bash
# Container entrypoint of one side of the deployment (EDEN_SIDE=encoder|ditdec, set by its Dockerfile):
# TorchServe on loopback with deploy/$EDEN_SIDE/config.properties, and, when $EDEN_PROXY_SECRET is set, the
# authenticating forwarder (deploy/keyproxy.py) on :8090 for clients outside the container. TorchServe writes
# key_file.json and logs in $EDEN_RUN_DIR (an emptyDir in Kubernetes). Stops both on SIGTERM.
set -euo pipefail
: "${EDEN_SIDE:?EDEN_SIDE must be encoder or ditdec}"
RUN_DIR=${EDEN_RUN_DIR:-/home/model-server/run}
CONFIG=/opt/eden/deploy/$EDEN_SIDE/config.properties
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
cd "$RUN_DIR"
export TMPDIR="$RUN_DIR/tmp" LOG_LOCATION="$RUN_DIR/logs" METRICS_LOCATION="$RUN_DIR/logs"
rm -f key_file.json

torchserve --start --foreground --ncs --ts-config "$CONFIG" --model-store /home/model-server/model-store &
TS_PID=$!
PROXY_PID=
if [ -n "${EDEN_PROXY_SECRET:-}" ]; then
  for _ in $(seq 1 120); do [ -f key_file.json ] && break; sleep 1; done
  python /opt/eden/deploy/keyproxy.py --listen 0.0.0.0:8090 --key-file "$RUN_DIR/key_file.json" &
  PROXY_PID=$!
else
  echo "entrypoint: EDEN_PROXY_SECRET not set: TorchServe is reachable only inside this container" >&2
fi

stop() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  torchserve --stop >/dev/null 2>&1 || kill "$TS_PID" 2>/dev/null || true
}
trap stop TERM INT
# Whichever stops first takes the container down (Kubernetes / the engine restarts it).
wait -n $TS_PID ${PROXY_PID:+$PROXY_PID} || true
stop
wait || true
