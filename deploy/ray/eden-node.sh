#!/usr/bin/env bash
# One node of a Ray cluster that serves EDEN (README "Many machines (Ray)"): TorchServe with BOTH archives on this
# machine's GPUs, then this machine joins the Ray cluster advertising the custom resource "eden"
# (eden_client/cluster.py schedules inputs only on nodes that have it) and telling its Ray tasks where TorchServe
# is, through the environment of `ray start` (its worker processes inherit it).
#
#   deploy/ray/eden-node.sh --address HEAD_HOST:6379 --model-store DIR [--ts-config FILE] [--run-dir DIR]
#                           [--name NAME] [--shm-dir DIR] [--attach] [-- MORE RAY START ARGS]
#
#   --model-store  the folder with eden_encoder.mar and eden_ditdec.mar, built for this node's GPUs
#                  (archive_scripts/build_archives.py --gpus N)
#   --ts-config    TorchServe's config (default deploy/ray/config.properties; its inference_address and
#                  management_address are what the tasks use)
#   --run-dir      where TorchServe runs: key_file.json, logs (default ./eden-node)
#   --name         the node's name in progress lines and the batch table (default: the host name)
#   --shm-dir      the archives' shm_dir, if not /dev/shm/eden
#   --attach       TorchServe is started by something else (another container of the pod, with its run dir
#                  shared as --run-dir): only wait until it serves both models, then join; leave when it stops
#                  answering for 30 s
#
# The node joins only once both models have all their workers READY. When Ray stops, TorchServe is stopped and
# the other way round (a node without one of them is no node); SIGTERM / SIGINT stop both.
# $RAY, $TORCHSERVE and $PYTHON name the commands (default ray, torchserve, python3).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
ADDRESS= STORE= CONFIG=$HERE/config.properties RUN_DIR=$PWD/eden-node NAME=$(hostname) SHM_DIR= ATTACH=0
RAY=${RAY:-ray} TORCHSERVE=${TORCHSERVE:-torchserve} PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --address) ADDRESS=$2; shift 2 ;;
    --model-store) STORE=$2; shift 2 ;;
    --ts-config) CONFIG=$2; shift 2 ;;
    --run-dir) RUN_DIR=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --shm-dir) SHM_DIR=$2; shift 2 ;;
    --attach) ATTACH=1; shift ;;
    --) shift; break ;;
    *) echo "eden-node: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[ -n "$ADDRESS" ] || { echo "eden-node: --address HEAD_HOST:PORT is required" >&2; exit 2; }
[ "$ATTACH" = 1 ] || [ -n "$STORE" ] || { echo "eden-node: --model-store DIR is required" >&2; exit 2; }
prop() { sed -n "s/^$1=//p" "$CONFIG" | tail -n 1; }
INFERENCE_URL=$(prop inference_address) MANAGEMENT_URL=$(prop management_address)
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/tmp"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
# TEMP: TorchServe's Java side puts its worker sockets there (-Djava.io.tmpdir), TMPDIR: its pid file; both in the
# run folder, so that several TorchServe instances on one machine never share a socket name.
ts() { (cd "$RUN_DIR" && TMPDIR="$RUN_DIR/tmp" TEMP="$RUN_DIR/tmp" LOG_LOCATION="$RUN_DIR/logs" \
        METRICS_LOCATION="$RUN_DIR/logs" exec "$TORCHSERVE" "$@"); }

TS_PID= RAY_PID=
stop() {
  trap - TERM INT
  [ -n "$RAY_PID" ] && kill -TERM "$RAY_PID" 2>/dev/null || true
  if [ -n "$TS_PID" ]; then ts --stop >/dev/null 2>&1 || kill -TERM "$TS_PID" 2>/dev/null || true; fi
}
trap 'stop; exit 143' TERM INT

if [ "$ATTACH" = 0 ]; then
  rm -f "$RUN_DIR/key_file.json"
  ts --start --foreground --ncs --ts-config "$CONFIG" --model-store "$STORE" >> "$RUN_DIR/torchserve.out" 2>&1 &
  TS_PID=$!
fi
ready() {
  for model in eden_encoder eden_ditdec; do
    "$PYTHON" "$ROOT/deploy/healthcheck.py" --inference-url "$INFERENCE_URL" --management-url "$MANAGEMENT_URL" \
      --key-file "$RUN_DIR/key_file.json" --model "$model" >/dev/null 2>&1 || return 1
  done
}
deadline=$((SECONDS + ${EDEN_READY_TIMEOUT_S:-900}))
until ready; do
  if [ -n "$TS_PID" ] && ! kill -0 "$TS_PID" 2>/dev/null; then
    echo "eden-node: TorchServe exited; $RUN_DIR/torchserve.out and $RUN_DIR/logs/ say why" >&2; exit 1
  fi
  [ $SECONDS -lt $deadline ] || { echo "eden-node: TorchServe not ready in time ($RUN_DIR/logs)" >&2; stop; exit 1; }
  sleep 1
done
echo "eden-node: TorchServe serves both models at $INFERENCE_URL; joining the Ray cluster at $ADDRESS as $NAME"

export EDEN_NODE_URL=$INFERENCE_URL EDEN_MANAGEMENT_URL=$MANAGEMENT_URL EDEN_KEY_FILE=$RUN_DIR/key_file.json \
       EDEN_NODE_NAME=$NAME EDEN_TRANSPORT=${EDEN_TRANSPORT:-auto}
[ -z "$SHM_DIR" ] || export EDEN_SHM_DIR=$SHM_DIR
"$RAY" start --address "$ADDRESS" --resources '{"eden": 1}' --block "$@" &
RAY_PID=$!
# Whichever stops first takes the node down (a supervisor, systemd or Kubernetes, starts it again). With --attach
# TorchServe is not our child: it is checked every 10 s, and 3 misses in a row take the node out of the cluster
# (its container restarting, say), so that no input is sent to a node that cannot serve it.
set +e
if [ "$ATTACH" = 1 ]; then
  misses=0
  while kill -0 "$RAY_PID" 2>/dev/null && [ $misses -lt 3 ]; do
    sleep 10 & wait $!
    if ready; then misses=0; else misses=$((misses + 1)); fi
  done
  [ $misses -lt 3 ] || echo "eden-node: TorchServe at $INFERENCE_URL has not answered for 30 s: leaving" >&2
  kill -0 "$RAY_PID" 2>/dev/null && rc=1 || { wait "$RAY_PID"; rc=$?; }
else
  wait -n $RAY_PID ${TS_PID:+$TS_PID}
  rc=$?
fi
echo "eden-node: $([ -n "$TS_PID" ] && ! kill -0 "$TS_PID" 2>/dev/null && echo TorchServe || echo Ray) stopped \
(exit code $rc): stopping the node" >&2
stop
wait
exit $((rc == 0 ? 1 : rc))
