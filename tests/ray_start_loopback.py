"""``ray start --address HEAD --resources JSON --block [...]`` for the cluster test, every port on 127.0.0.1.

On this test machine the real ``ray start`` turns ``--address 127.0.0.1:PORT`` into the host's outside address and
binds its raylet and worker ports to all interfaces; the cluster test must stay on loopback. This joins the same
worker node through the node launcher that ``ray.cluster_utils.Cluster.add_node`` uses (``ray._private.node.Node``),
with node IP 127.0.0.1 and OS-picked ports, and then blocks like ``--block``. It accepts the arguments
deploy/ray/eden-node.sh passes to ``ray start`` (and refuses others), so the recipe runs unchanged with
``RAY=<this>``. SIGTERM stops the node; SIGKILL of its process group loses it (what the test does).
Nodes of one machine join one at a time (a lock file): Ray picks some of a node's ports by probing for free ones, so
two nodes starting at once on one host can pick the same port (on a real cluster each machine has one node).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import tempfile
import signal
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(prog="ray")
    ap.add_argument("command", choices=["start"])
    ap.add_argument("--address", required=True)
    ap.add_argument("--resources", default="{}")
    ap.add_argument("--num-cpus", type=int, default=1)
    ap.add_argument("--node-ip-address", default="127.0.0.1", choices=["127.0.0.1"])
    ap.add_argument("--object-store-memory", type=int, default=100 * 1024 * 1024)
    ap.add_argument("--block", action="store_true", required=True)
    args = ap.parse_args()

    import ray._private.services as services
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(gcs_address=args.address, node_ip_address="127.0.0.1", resources=json.loads(args.resources),
                       num_cpus=args.num_cpus, num_gpus=0, object_store_memory=args.object_store_memory,
                       min_worker_port=0, max_worker_port=0, node_manager_port=0, include_log_monitor=False)
    params.dashboard_agent_listen_port = None
    lock_path = f"{tempfile.gettempdir()}/ray-start-loopback-{args.address.replace(':', '_')}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
        services.wait_for_node(node.gcs_address, node.plasma_store_socket_name, 60)
    print(f"ray-start-loopback: joined {args.address} as node {node.node_id} with {args.resources}", flush=True)

    def stop(*_):
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
