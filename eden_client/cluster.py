"""``batch IN_DIR OUT_DIR --ray ADDRESS``: the inputs of a batch spread over a Ray cluster, each node a whole
deployment (TorchServe with both halves on its own GPUs; README "Many machines (Ray)").

* A node serves EDEN when its raylet advertises the custom resource ``eden`` (1 per node; ``ray start --resources
  '{"eden": 1}'``, deploy/ray/eden-node.sh). Each input is one Ray task asking for ``1/per_node`` of it, so Ray runs
  at most ``--per-node`` inputs at a time on a node and never one on a node without EDEN (the head, CPU nodes).
* A task finds its node's TorchServe in the environment the node's raylet was started with, which its worker
  processes inherit: ``$EDEN_NODE_URL`` (inference URL, default http://127.0.0.1:8080), ``$EDEN_KEY_FILE`` (or
  ``$EDEN_INFERENCE_KEY``), ``$EDEN_MANAGEMENT_URL`` (key renewal), ``$EDEN_TRANSPORT`` (default auto: the
  probe finds the fast same-host transport), ``$EDEN_SHM_DIR``, ``$EDEN_NODE_NAME`` (how tables and progress name the node). It runs
  eden_client.batch.process (eden_client.convert), exactly what a plain batch runs for one input, so outputs are written
  under a temporary name and renamed when complete.
* Inputs and outputs must be on storage every node sees, under the same path.
* A node lost mid-batch (its raylet gone) takes its running tasks with it; Ray runs them again elsewhere (up to
  ``--ray-retries`` times) and the new attempt removes what the lost one left under the temporary name. A node whose
  Ray is up but whose TorchServe does not answer gives its input back, and the driver submits it again with that node
  excluded (a ``ray.io/node-id`` label selector). Every attempt is recorded by a small actor on the driver's node,
  so the table says where each input ran and what was retried.

``ray`` is imported only here and only when --ray is used (``pip install 'eden-serve[cluster]'``).
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .frames_io import FramesError

RESOURCE = "eden"  # the custom resource a serving node advertises (1 per node)
NODE_URL_ENV = "EDEN_NODE_URL"
TRANSPORT_ENV = "EDEN_TRANSPORT"
SHM_DIR_ENV = "EDEN_SHM_DIR"
NODE_NAME_ENV = "EDEN_NODE_NAME"
INSTALL_HINT = ("--ray needs Ray on this machine and on every node: pip install 'eden-serve[cluster]' "
                "(or pip install 'ray>=2.60')")
NO_NODE_GRACE_S = float(os.environ.get("EDEN_RAY_NO_NODE_GRACE_S", "120"))  # no EDEN node left: fail after this
POLL_S = 0.5


def add_args(p: argparse.ArgumentParser) -> None:
    """The batch command's cluster flags."""
    g = p.add_argument_group("Ray cluster (README: Many machines)")
    g.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="spread the inputs over this Ray cluster ('auto': the one this machine belongs to, or "
                        "host:port of its head), one task per input on the nodes that serve EDEN, "
                        "each using its own node's TorchServe (the connection flags do not apply); IN_DIR and "
                        "OUT_DIR must be on storage every node sees")
    g.add_argument("--per-node", type=int, default=2,
                   help="with --ray: inputs at a time on each node (default 2: one's decoding and writing overlap "
                        "the other's requests)")
    g.add_argument("--ray-retries", type=int, default=3,
                   help="with --ray: times an input is run again after its node was lost (default 3)")


# ---------------------------------------------------------------------- on the node
def node_name() -> str:
    return os.environ.get(NODE_NAME_ENV) or socket.gethostname()


def node_client(timeout: float):
    """This node's EdenClient (the one place that picks the transport; the node's env says where TorchServe is)."""
    from .api import EdenClient
    from .keys import KeySource
    from .model_client import DEFAULT_URL
    return EdenClient.connect(os.environ.get(NODE_URL_ENV, DEFAULT_URL), encoder_keys=KeySource.default(),
                              timeout=timeout, transport=os.environ.get(TRANSPORT_ENV, "auto"),
                              shm_dir=os.environ.get(SHM_DIR_ENV) or None)


def node_serves(timeout: float = 5.0) -> str | None:
    """None if this node's TorchServe answers /ping as Healthy, else why not."""
    import requests

    from .errors import ServeError
    from .keys import KeySource
    from .model_client import DEFAULT_URL
    url = os.environ.get(NODE_URL_ENV, DEFAULT_URL).rstrip("/")
    try:
        key = KeySource.default().read("inference")
        r = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout)
        if r.status_code == 200 and r.json().get("status") == "Healthy":
            return None
        return f"{url}/ping answered {r.status_code}"
    except (requests.RequestException, ServeError, ValueError) as e:
        return f"{url} does not answer ({type(e).__name__})"


def run_input(key: int, src: str, dst: str, name: str, options, tracker, timeout: float, redo: str = "",
              out_dir: str | None = None) -> dict:
    """One input on this node (the body of each Ray task). Returns status, detail, node, node_id, attempt."""
    import ray

    from .batch import Cancelled, Job, _expected_frames, process
    node_id = ray.get_runtime_context().get_node_id()
    here = {"node": node_name(), "node_id": node_id}
    job = Job(Path(src), Path(dst), name, redo=redo, out_dir=Path(out_dir) if out_dir else None)
    job.frames = _expected_frames(job, options) if Path(src).exists() else 0
    attempt = ray.get(tracker.started.remote(key, here["node"], node_id, job.frames))
    out = {**here, "attempt": attempt}
    problem = node_serves()
    if problem:  # this node's Ray is up but its EDEN is not: give the input back (the driver excludes the node)
        return {**out, "status": "unavailable", "detail": problem}
    if not Path(src).exists():
        return {**out, "status": "failed",
                "detail": f"{src} is not visible on node {here['node']}: IN_DIR must be on storage every node sees"}
    last = [0.0]

    def on_progress(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= POLL_S:
            last[0] = now
            if ray.get(tracker.progress.remote(key, done)):
                raise Cancelled()

    try:
        client = node_client(timeout)  # (the transport probe asks this node's TorchServe)
    except Exception as e:  # noqa: BLE001 - this node cannot serve it now: another may
        return {**out, "status": "unavailable", "detail": f"cannot connect to this node's TorchServe: {e}"}
    process(job, client, options, on_progress)
    if job.status == "failed":
        problem = node_serves()
        if problem:  # it failed because TorchServe went away: another node may do it
            return {**out, "status": "unavailable", "detail": f"{problem} ({job.detail})"}
    return {**out, "status": job.status, "detail": job.detail}


class Tracker:
    """Attempts and progress of the tasks (a Ray actor on the driver's node, so it outlives lost nodes)."""

    def __init__(self):
        self.events: list[tuple] = []  # (key, node, node_id, attempt, frames) for every start, in order
        self.attempts: dict[int, int] = {}
        self.done: dict[int, int] = {}
        self.cancelled = False

    def started(self, key: int, node: str, node_id: str, frames: int) -> int:
        self.attempts[key] = self.attempts.get(key, 0) + 1
        self.done[key] = 0
        self.events.append((key, node, node_id, self.attempts[key], frames))
        return self.attempts[key]

    def progress(self, key: int, done: int) -> bool:
        self.done[key] = done
        return self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def poll(self, since: int, keys: list[int] = ()) -> tuple[list[tuple], dict[int, int]]:
        """Starts since event number ``since``, and the frames done of the inputs ``keys``."""
        return self.events[since:], {k: self.done[k] for k in keys if k in self.done}


# ---------------------------------------------------------------------- on the driver
@dataclass
class _Item:
    job: object  # eden_client.batch.Job
    ref: object = None
    started: list[tuple[str, str]] = field(default_factory=list)  # (node, node_id) of each attempt
    excluded: list[str] = field(default_factory=list)  # node ids whose TorchServe did not answer
    notes: list[str] = field(default_factory=list)


def input_bytes(src: Path) -> int:
    try:
        if src.is_dir():
            return sum(f.stat().st_size for f in src.iterdir() if f.is_file())
        return src.stat().st_size
    except OSError:
        return 0


def import_ray():
    try:
        import ray
    except ImportError:
        raise FramesError(INSTALL_HINT) from None
    return ray


def resource_share(per_node: int) -> float:
    """The fraction of a node's ``eden: 1`` one task asks for, so that exactly ``per_node`` fit (Ray counts resources
    in units of 1/10000)."""
    if not 1 <= per_node <= 100:
        raise FramesError(f"--per-node must be 1..100, got {per_node}")
    return math.floor(10000 / per_node) / 10000


def runner(args, options):
    """The batch runner for ``--ray`` (see eden_client.batch.run_batch): checks Ray is installed now, connects when
    there is something to do."""
    ray = import_ray()
    share = resource_share(args.per_node)
    if args.ray_retries < 0:
        raise FramesError(f"--ray-retries must be 0 or more, got {args.ray_retries}")

    # the inputs a node runs at once share its cores for encoding
    options = options.shared_by(args.per_node)

    def run(pending, progress) -> bool:
        if not pending:
            return False
        return RayBatch(ray, args.ray, share, args.ray_retries, options, args.timeout).run(pending, progress)
    return run


class RayBatch:
    def __init__(self, ray, address: str, share: float, retries: int, options, timeout: float):
        self.ray, self.address, self.share, self.retries = ray, address, share, retries
        self.options, self.timeout = options, timeout

    def connect(self):
        ray = self.ray
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError depending on the address
            raise FramesError(f"cannot connect to the Ray cluster at {self.address}: {e}".splitlines()[0]) from None
        if not ray.cluster_resources().get(RESOURCE):
            ray.shutdown()
            raise FramesError(f"no node of the Ray cluster at {self.address} serves EDEN (none advertises the "
                              f"resource '{RESOURCE}'): start nodes with deploy/ray/eden-node.sh")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = ray.get_runtime_context().get_node_id()
        self.tracker = ray.remote(Tracker).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()
        self.task = ray.remote(run_input)

    def submit(self, key: int, item: _Item) -> None:
        opts = {"num_cpus": 0, "resources": {RESOURCE: self.share}, "max_retries": self.retries,
                "retry_exceptions": False}
        if item.excluded:
            opts["label_selector"] = {"ray.io/node-id": f"!in({','.join(item.excluded)})"}
        job = item.job
        item.ref = self.task.options(**opts).remote(key, str(job.src), str(job.dst), job.name, self.options,
                                                    self.tracker, self.timeout, job.redo,
                                                    str(job.out_dir) if job.out_dir else None)

    def run(self, pending, progress) -> bool:
        ray = self.ray
        items = {k: _Item(job) for k, job in enumerate(pending)}
        self.tracker = None
        try:
            self.connect()
            # largest inputs first (bytes on disk as the measure of work: a stat, not an open), so that a long
            # video does not start last and leave the other nodes idle at the end (bench/cluster_sim.py)
            for key in sorted(items, key=lambda k: -input_bytes(items[k].job.src)):
                self.submit(key, items[key])
            self._wait(items, progress)
            return False
        except KeyboardInterrupt:
            self._cancel(items, progress)
            return True
        finally:
            if ray.is_initialized():
                ray.shutdown()

    def _wait(self, items: dict[int, _Item], progress) -> None:
        ray = self.ray
        seen, running = 0, {}
        no_node_since, last_check = None, 0.0
        while any(i.ref is not None for i in items.values()):
            refs = {i.ref: k for k, i in items.items() if i.ref is not None}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=POLL_S)
            events, done = ray.get(self.tracker.poll.remote(seen, list(running)))
            seen += len(events)
            for key, node, node_id, attempt, frames in events:
                item = items[key]
                if item.ref is None:
                    continue
                item.started.append((node, node_id))
                if frames and not item.job.frames:  # counted on the node (the driver does not open the inputs)
                    item.job.frames = frames
                    progress.total_frames += frames
                label = f"{item.job.name} on {node}" + (f" (attempt {attempt})" if attempt > 1 else "")
                progress.start(key, label, item.job.frames)
                running[key] = True
            for key in running:
                if key in done:
                    progress.update(key, done[key])
            for ref in ready:
                self._finish(refs[ref], items[refs[ref]], ref, progress, running)
            now = time.monotonic()
            if now - last_check >= 5:  # every EDEN node gone: fail what is left after a grace period
                last_check = now
                if ray.cluster_resources().get(RESOURCE):
                    no_node_since = None
                elif no_node_since is None:
                    no_node_since = now
                elif now - no_node_since > NO_NODE_GRACE_S:
                    for key, item in items.items():
                        if item.ref is not None:
                            ray.cancel(item.ref, force=True)
                            item.ref = None
                            self._end(key, item, "failed", f"no node serving EDEN left in the cluster for "
                                                           f"{NO_NODE_GRACE_S:.0f} s", progress, running)

    def _finish(self, key: int, item: _Item, ref, progress, running: dict) -> None:
        ray = self.ray
        item.ref = None
        try:
            res = ray.get(ref)
        except ray.exceptions.RayError as e:  # its node was lost more than --ray-retries times, or worse
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._end(key, item, "failed", f"{type(e).__name__}: {reason}", progress, running)
            return
        if res["status"] == "unavailable":
            item.notes.append(f"{res['node']}: {res['detail']}")
            item.excluded.append(res["node_id"])
            others = set(self.eden_nodes()) - set(item.excluded)
            if len(item.started) <= self.retries and others:
                running.pop(key, None)
                self.submit(key, item)
                return
            self._end(key, item, "failed", f"no node could serve it ({res['detail']})", progress, running)
            return
        self._end(key, item, res["status"], res["detail"], progress, running)

    def eden_nodes(self) -> list[str]:
        """Ids of the live nodes that advertise EDEN."""
        return [n["NodeID"] for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(RESOURCE)]

    def _end(self, key: int, item: _Item, status: str, detail: str, progress, running: dict) -> None:
        job = item.job
        where = item.started[-1][0] if item.started else "no node"
        lost = [n for n, _ in item.started[:-1]]
        note = f"on {where}"
        if lost:
            note += f", attempt {len(item.started)}: retried after " + ", ".join(
                f"{n} was lost" if not any(x.startswith(f"{n}:") for x in item.notes) else f"{n} did not serve"
                for n in lost)
        job.status, job.detail = status, f"{detail} [{note}]"
        running.pop(key, None)
        if key not in progress.items:
            progress.start(key, job.name, job.frames)
        progress.finish(key, f"{job.status} {job.name}: {job.detail}")

    def _cancel(self, items: dict[int, _Item], progress) -> None:
        """Ctrl-C: running tasks stop at their next progress report and remove their partial output."""
        ray = self.ray
        if self.tracker is None:  # interrupted while connecting: nothing was submitted
            for item in items.values():
                item.job.status, item.job.detail = "interrupted", "not started"
            return
        try:
            ray.get(self.tracker.cancel.remote(), timeout=10)  # running tasks: Cancelled at their next report
            started = {e[0] for e in ray.get(self.tracker.poll.remote(0), timeout=10)[0]}
        except Exception:  # noqa: BLE001 - stopping anyway
            started = set()
        refs = {i.ref: k for k, i in items.items() if i.ref is not None}
        for ref, key in refs.items():
            if key not in started:
                ray.cancel(ref)  # queued: dropped
        deadline = time.monotonic() + 30
        while refs and time.monotonic() < deadline:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1)
            for ref in ready:
                key = refs.pop(ref)
                items[key].ref = None
                try:
                    res = ray.get(ref)
                    items[key].job.status, items[key].job.detail = res["status"], res["detail"]
                except Exception:  # noqa: BLE001 - cancelled before it ran
                    pass
        for ref in refs:  # still running after 30 s: stopped the hard way (a rerun removes the partial output)
            ray.cancel(ref, force=True)
        for key, item in items.items():
            if item.job.status == "pending":
                item.job.status = "interrupted"
                item.job.detail = "stopped" if item.started or key in started else "not started"
