"""Sub-commands of python -m eden_client for operators: status, scale, models (see eden_client/ops.py).

    status [--json] [--wait S]                        both models: versions, workers, GPUs, queue, requests, health
    scale MODEL --workers N | --min N [--max N]       change a model's workers and wait until they are READY
    models list                                       registered models and their versions
    models register ARCHIVE [--workers N]             add a version (needs enable_model_api=true on the server)
    models set-default MODEL VERSION                  route the model's requests to VERSION
    models unregister MODEL VERSION                   remove a version

Every command takes the management address (--management-url, $EDEN_MANAGEMENT_URL, default
http://127.0.0.1:8081) and the key file (--key-file, $EDEN_KEY_FILE, ./key_file.json; $EDEN_MANAGEMENT_KEY gives the
key itself). With two TorchServe instances (encoder on one host, DiT+decoder on another) the --ditdec-* options name
the second one; commands about eden_ditdec then go there.
"""
from __future__ import annotations

import argparse
import json
import os

from .keys import MANAGEMENT_URL_ENV
from .ops import (DEFAULT_INFERENCE_URL, DEFAULT_MANAGEMENT_URL, DEFAULT_METRICS_URL, MAX_WORKERS,
                  WORKERS_PER_DEVICE, Server, collect_status, format_status, gpu_of)


def add_server_args(p: argparse.ArgumentParser, with_status_ports: bool = False) -> None:
    g = p.add_argument_group("servers")
    g.add_argument("--management-url", default=os.environ.get(MANAGEMENT_URL_ENV) or DEFAULT_MANAGEMENT_URL,
                   help=f"TorchServe management API (${MANAGEMENT_URL_ENV}, default {DEFAULT_MANAGEMENT_URL})")
    g.add_argument("--key-file", default=None,
                   help="that server's key_file.json (default: $EDEN_KEY_FILE, else ./key_file.json)")
    g.add_argument("--ditdec-management-url", default=None,
                   help="management API of a second TorchServe serving eden_ditdec (two-host deployments)")
    g.add_argument("--ditdec-key-file", default=None, help="key file of that second TorchServe")
    if with_status_ports:
        g.add_argument("--inference-url", default=None,
                       help=f"inference API, for the health check (default {DEFAULT_INFERENCE_URL} when the management "
                            "URL is the default one, else not checked; '' skips it)")
        g.add_argument("--metrics-url", default=None,
                       help=f"metrics API, for requests served (default {DEFAULT_METRICS_URL} when the management URL "
                            "is the default one; '' skips it)")
        g.add_argument("--ditdec-inference-url", default=None, help="inference API of the second TorchServe")
        g.add_argument("--ditdec-metrics-url", default=None, help="metrics API of the second TorchServe")


def servers_of(args) -> list[Server]:
    """The one or two servers the arguments name."""
    local_default = args.management_url.rstrip("/") == DEFAULT_MANAGEMENT_URL
    inference, metrics = getattr(args, "inference_url", None), getattr(args, "metrics_url", None)
    if inference is None and local_default:  # the ports of config.properties; elsewhere they are not guessed
        inference = DEFAULT_INFERENCE_URL
    if metrics is None and local_default:
        metrics = DEFAULT_METRICS_URL
    first = Server(args.management_url, inference or None, metrics or None, args.key_file,
                   "encoder" if args.ditdec_management_url else "")
    if not args.ditdec_management_url:
        return [first]
    second = Server(args.ditdec_management_url, getattr(args, "ditdec_inference_url", None) or None,
                    getattr(args, "ditdec_metrics_url", None) or None, args.ditdec_key_file or args.key_file,
                    "DiT+decoder")
    return [first, second]


def server_for(args, model: str | None) -> Server:
    """The server a command about ``model`` goes to: the --ditdec-* one for eden_ditdec* if given."""
    servers = servers_of(args)
    if len(servers) == 2 and model and model.startswith("eden_ditdec"):
        return servers[1]
    return servers[0]


MEMORY_NOTE = ("MEMORY -: not measured yet. TorchServe measures its workers' memory with its system metrics "
               "collector, once a minute (metric_time_interval, default 60 s), so a worker started less than a "
               "minute ago has none yet; served requests do not change that.")


def serving(status: dict) -> bool:
    """Every server has models, and every model version its minimum of workers (at least one) READY."""
    for server in status["servers"]:
        if not server["models"]:
            return False
        for m in server["models"]:
            ready = sum(w.get("status") == "READY" for w in m["workers"])
            if ready < max(1, m.get("minWorkers") or 0):
                return False
    return True


def wait_until_serving(args, timeout: float, poll: float = 1.0) -> dict:
    """Poll until ``serving``: TorchServe may not answer yet, nor have written its key file, while it starts."""
    import time
    from .errors import ServeError
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = collect_status(servers_of(args))
            problem = None if serving(status) else "not every model has its workers READY"
        except ServeError as e:
            status, problem = None, str(e)
        if problem is None:
            return status
        if time.monotonic() >= deadline:
            raise ServeError(f"not ready after {timeout:.0f} s: {problem} (see TorchServe's logs/model_log.log)")
        time.sleep(poll)


def cmd_status(args) -> int:
    status = (wait_until_serving(args, args.wait) if args.wait is not None
              else collect_status(servers_of(args)))
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    text = format_status(status)
    unmeasured = any(not w.get("memoryUsage") for s in status["servers"] for m in s["models"] for w in m["workers"])
    print(text + (f"\n{MEMORY_NOTE}\n" if unmeasured else ""), end="")
    return 0


def cmd_scale(args) -> int:
    client = server_for(args, args.model).management()
    desc = client.scale(args.model, args.workers, args.min, args.max, args.version, args.timeout,
                        args.max_per_device)
    workers = desc.get("workers", [])
    where = ", ".join(f"{w['id']} (pid {w['pid']}, " + ("cpu" if gpu_of(w) is None else f"cuda:{gpu_of(w)}") + ")"
                      for w in workers)
    print(f"{args.model} {desc['modelVersion']}: {len(workers)} worker(s) READY (min {desc['minWorkers']}, "
          f"max {desc['maxWorkers']})" + (f": {where}" if where else ""))
    return 0


def cmd_models_list(args) -> int:
    rows = []
    for server in servers_of(args):
        client = server.management()
        for name in client.models():
            default = client.default_version(name)
            for d in client.describe(name):
                rows.append({"server": client.url, "model": name, "version": d["modelVersion"],
                             "default": d["modelVersion"] == default, "url": d.get("modelUrl"),
                             "workers": len(d.get("workers", []))})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['server']}  {r['model']}  {r['version']}{' (default)' if r['default'] else ''}  "
                  f"{r['url']}  {r['workers']} worker(s)")
    return 0


def cmd_models_register(args) -> int:
    client = server_for(args, args.name or os.path.basename(args.archive)).management()
    body = client.register(args.archive, args.name, args.workers, args.timeout)
    print(body.get("status", body) if isinstance(body, dict) else body)
    return 0


def cmd_models_unregister(args) -> int:
    server = server_for(args, args.model)  # (its metrics_url: --metrics-url, or the local default)
    body = server.management().unregister(args.model, args.version, args.drain_timeout, args.quiet,
                                          server.metrics_url)
    print(body.get("status", body) if isinstance(body, dict) else body)
    return 0


def cmd_models_set_default(args) -> int:
    body = server_for(args, args.model).management().set_default(args.model, args.version)
    print(body.get("status", body) if isinstance(body, dict) else body)
    return 0


def register(sub) -> None:
    """Add this module's sub-commands to the argparse sub-parsers ``sub`` (called by eden_client.cli.main)."""
    p = sub.add_parser("status", help="workers, GPUs, queues and health of the served models",
                       description="A table of every model version: workers (state, pid, GPU, memory), queue, "
                                   "requests served, and the server's health.")
    p.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of the table")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="first wait (up to SECONDS) until TorchServe answers and every model has its workers "
                        "READY; exit 1 if it does not happen in time (for scripts right after torchserve --start)")
    add_server_args(p, with_status_ports=True)
    p.set_defaults(fn=cmd_status)

    p = sub.add_parser("scale", help="change a model's number of workers and wait until they are up")
    p.add_argument("model", help="eden_encoder or eden_ditdec")
    p.add_argument("--workers", type=int, default=None, help="exactly N workers (sets min and max)")
    p.add_argument("--min", type=int, default=None, help="minimum workers (TorchServe keeps this many running)")
    p.add_argument("--max", type=int, default=None, help="maximum workers")
    p.add_argument("--version", default=None, help="model version (default: the default version)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the workers (default 300)")
    p.add_argument("--max-per-device", type=int, default=WORKERS_PER_DEVICE,
                   help=f"workers allowed per GPU (or per CPU model), default {WORKERS_PER_DEVICE}; never more than "
                        f"{MAX_WORKERS} in all, nor (same host) more than the available memory holds")
    add_server_args(p)
    p.set_defaults(fn=cmd_scale)

    p = sub.add_parser("models", help="list, register, unregister model versions and set the default")
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="registered models and versions")
    q.add_argument("--json", action="store_true")
    add_server_args(q)
    q.set_defaults(fn=cmd_models_list)
    q = msub.add_parser("register", help="register an archive of the server's model store as a new version "
                                         "(needs enable_model_api=true there)")
    q.add_argument("archive", help="file name of a .mar in the server's model store (or its file:// URL)")
    q.add_argument("--name", default=None, help="model name (default: the archive's)")
    q.add_argument("--workers", type=int, default=1, help="workers to start (default 1)")
    q.add_argument("--timeout", type=float, default=300)
    add_server_args(q)
    q.set_defaults(fn=cmd_models_register)
    q = msub.add_parser("unregister", help="remove one version of a model once it is idle")
    q.add_argument("model")
    q.add_argument("version")
    q.add_argument("--drain-timeout", type=float, default=60,
                   help="seconds to wait for the version to be idle before giving up (default 60; nothing removed)")
    q.add_argument("--quiet", type=float, default=5,
                   help="seconds without a queued, arriving or finishing request that count as idle (default 5)")
    q.add_argument("--metrics-url", default=None,
                   help="metrics API, to see requests arriving and finishing (default: the local one when the "
                        "management URL is the default; '' skips it)")
    add_server_args(q)
    q.set_defaults(fn=cmd_models_unregister)
    q = msub.add_parser("set-default", help="make VERSION the one /predictions/MODEL uses")
    q.add_argument("model")
    q.add_argument("version")
    add_server_args(q)
    q.set_defaults(fn=cmd_models_set_default)
