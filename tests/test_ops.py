"""Operating the deployment (eden_client/ops.py, python -m eden_client status|scale|models) against real TorchServe
instances.

The module starts its own TorchServe (``ops_server``: model registration on, 1-minute keys, the declared metrics of
deploy/metrics.yaml) so that scaling and version changes do not disturb the session-wide ``server``; the two-host
test starts two more, one model each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from conftest import FIXTURE, ROOT, TEST_SETTINGS, read_rgb

from eden_serve.archives import ENCODER_BATCH_SIZE, build, placement
from eden_client.api import EdenClient
from eden_client.errors import ServeError
from eden_client.keys import KeySource, expiry_time
from eden_client.ops import ManagementClient, Server, collect_status, format_status, gpu_of, parse_prometheus
from eden_dev.launcher import TorchServe, free_port

pytestmark = pytest.mark.server

MODELS = ("eden_encoder", "eden_ditdec")


def run_client(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("EDEN_KEY_FILE", "EDEN_INFERENCE_KEY", "EDEN_MANAGEMENT_KEY", "EDEN_MANAGEMENT_URL"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "eden_client", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)


def grpc_ports() -> dict:
    return {"grpc_inference_port": free_port(), "grpc_management_port": free_port()}


def raw(ts: TorchServe, path: str, kind: str = "management", key: str | None = None, method: str = "GET"):
    """A call straight to TorchServe's management API with the key file's key (renewed if it has expired)."""
    key = key if key is not None else KeySource(key_file=ts.key_file, management_url=ts.management_url).read(kind)
    return requests.request(method, f"{ts.management_url}{path}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)


@pytest.fixture(scope="module")
def ops_store(tiny_store, tmp_path_factory):
    """A copy of the tiny archives: the version tests add archives to it."""
    store = tmp_path_factory.mktemp("ops_store")
    for mar in tiny_store.glob("*.mar"):
        shutil.copy2(mar, store / mar.name)
    return store


@pytest.fixture(scope="module")
def ops_server(ops_store, tmp_path_factory):
    extra = {"enable_model_api": "true", "token_expiration_min": 1,
             "metrics_config": str(ROOT / "deploy" / "metrics.yaml"), **grpc_ports()}
    with TorchServe(tmp_path_factory.mktemp("ops_serve"), ops_store, extra_config=extra) as ts:
        yield ts


def keys_of(ts: TorchServe) -> KeySource:
    """The server's key file, renewed when a key expires (ops_server's keys last one minute)."""
    return KeySource(key_file=ts.key_file, management_url=ts.management_url)


@pytest.fixture(scope="module", autouse=True)
def expiring_server(ops_store, tmp_path_factory):
    """A TorchServe with 1-minute keys (the encoder only), started in the background as soon as this module starts
    so that its first keys have expired, or nearly, when test_an_expired_key_is_renewed_not_a_failure runs.
    Yields a function that waits for the start and returns the instance."""
    ts = TorchServe(tmp_path_factory.mktemp("expiring_serve"), ops_store, models=["eden_encoder.mar"],
                    extra_config={"token_expiration_min": 1, **grpc_ports()})
    failure: list = []

    def start():
        try:
            ts.start()
        except Exception as e:  # noqa: BLE001 - reported by the test that uses it
            failure.append(e)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()

    def ready() -> TorchServe:
        thread.join(300)
        if failure:
            raise failure[0]
        return ts

    yield ready
    thread.join(300)
    ts.stop()


def args_for(ts: TorchServe) -> list:
    return ["--management-url", ts.management_url, "--key-file", ts.key_file]


def status_args(ts: TorchServe) -> list:
    return [*args_for(ts), "--inference-url", ts.inference_url, "--metrics-url", ts.metrics_url]


@pytest.fixture(scope="module")
def mgmt(ops_server):
    return ManagementClient(ops_server.management_url, keys_of(ops_server))


def interpolate_fixture(client: EdenClient) -> np.ndarray:
    frames = [(FIXTURE / f"frame{i}.png").read_bytes() for i in (0, 1)]
    return read_rgb(client.interpolate(*frames, seed=0))


def official_frame() -> np.ndarray:
    return read_rgb(FIXTURE / "expected.png").astype(int)


# ---------------------------------------------------------------------- without a server
def test_placement_profiles():
    assert placement(0) == placement(0, "spread") == {"eden_encoder": [], "eden_ditdec": []}
    assert placement(1, "split") == placement(1, "spread") == placement(1) == {"eden_encoder": [0], "eden_ditdec": [0]}
    assert placement(2) == placement(2, "all") == {"eden_encoder": [0, 1], "eden_ditdec": [0, 1]}  # the default
    assert placement(2, "spread") == {"eden_encoder": [0], "eden_ditdec": [0, 1]}
    assert placement(2, "split") == {"eden_encoder": [0], "eden_ditdec": [1]}
    assert placement(4, "split") == {"eden_encoder": [0], "eden_ditdec": [1, 2, 3]}
    assert placement(4, "spread") == {"eden_encoder": [0], "eden_ditdec": [0, 1, 2, 3]}
    assert placement(1, "all") == placement(1) and placement(0, "all") == placement(0)
    assert placement(2, side="ditdec") == {"eden_ditdec": [0, 1]}
    assert placement(0, side="encoder") == {"eden_encoder": []}
    with pytest.raises(ValueError, match="unknown placement profile"):
        placement(2, "fast")


@pytest.mark.parametrize("profile, encoder_gpus, ditdec_gpus", [("split", [0], [1, 2, 3]), ("spread", [0], [0, 1, 2, 3]),
                                                               ("all", [0, 1, 2, 3], [0, 1, 2, 3])])
def test_archives_for_four_gpus_are_one_flag(tiny_weights, tmp_path, profile, encoder_gpus, ditdec_gpus):
    """Built here without GPUs: the placement is written into each archive's model-config.yaml."""
    import yaml
    import zipfile
    r = subprocess.run([sys.executable, str(ROOT / "archive_scripts" / "build_archives.py"), "--weights", tiny_weights,
                        "--model-store", tmp_path, "--gpus", "4", "--profile", profile], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    configs = {}
    for name in MODELS:
        with zipfile.ZipFile(tmp_path / f"{name}.mar") as z:
            configs[name] = yaml.safe_load(z.read("model-config.yaml"))
    # two workers of each model on each of its GPUs (build_archives.WORKERS_PER_GPU)
    assert configs["eden_encoder"]["deviceIds"] == encoder_gpus
    assert configs["eden_encoder"]["minWorkers"] == 2 * len(encoder_gpus)
    assert configs["eden_ditdec"]["deviceIds"] == ditdec_gpus
    assert configs["eden_ditdec"]["minWorkers"] == configs["eden_ditdec"]["maxWorkers"] == 2 * len(ditdec_gpus)
    # the most shared GPU: GPU 0 with both models' workers in the spread profile, every GPU in all (the 4K memory
    # rule counts them)
    assert {c["eden"]["workers_on_gpu"] for c in configs.values()} == {2 if profile == "split" else 4}
    assert {c["deviceType"] for c in configs.values()} == {"gpu"}
    assert configs["eden_ditdec"]["batchSize"] == 4 and configs["eden_encoder"]["batchSize"] == ENCODER_BATCH_SIZE == 1


def test_the_encoders_batch_size_apart(tiny_weights, tmp_path):
    import yaml
    import zipfile
    r = subprocess.run([sys.executable, str(ROOT / "archive_scripts" / "build_archives.py"), "--weights", tiny_weights,
                        "--model-store", tmp_path, "--gpus", "0", "--encoder-batch-size", "3"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    batch = {}
    for name in MODELS:
        with zipfile.ZipFile(tmp_path / f"{name}.mar") as z:
            batch[name] = yaml.safe_load(z.read("model-config.yaml"))["batchSize"]
    assert batch == {"eden_encoder": 3, "eden_ditdec": 4}


def test_key_expiry_and_status_parsing():
    when = expiry_time("2026-11-25T17:56:31.344341680Z")
    assert (when.hour, when.minute, when.second, when.microsecond) == (17, 56, 31, 344341)
    assert expiry_time("soon") is None
    assert gpu_of({"gpuUsage": "gpuId::1 utilization.gpu [%]::3 % memory.used [MiB]::1200 MiB"}) == 1
    assert gpu_of({"gpuUsage": "N/A"}) is None
    m = parse_prometheus('# HELP x\nts_inference_requests_total{model_name="eden_encoder",hostname="h",} 3.0\n')
    assert m["ts_inference_requests_total"] == [({"model_name": "eden_encoder", "hostname": "h"}, 3.0)]


def test_a_refused_management_key_is_read_again_from_the_file(tmp_path):
    """The key file is parsed again only when it changes (eden_client/keys.py), looked at every 0.25 s: a refused
    key must still be read from the file at once, or a key rotated a moment ago is sent again."""
    path = tmp_path / "key_file.json"

    def write(key):
        path.write_text(json.dumps({"management": {"key": key}, "inference": {"key": "i"}, "API": {"key": "a"}}))

    class Session:
        sent: list = []

        def request(self, method, url, params=None, headers=None, timeout=None):
            self.sent.append(headers["Authorization"])
            r = requests.Response()
            if len(self.sent) == 1:
                write("new")  # rotated under us (the same size: a coarse timestamp would not show it either)
                r.status_code, r._content = 400, b'{"code": 400, "type": "InvalidKeyException", "message": "no"}'
            else:
                r.status_code, r._content = 200, b'{"models": []}'
            return r

    write("old")
    keys = KeySource(key_file=path)
    assert keys.read("management") == "old"
    client = ManagementClient("http://127.0.0.1:9", keys=keys, session=Session())
    assert client.request("GET", "/models") == {"models": []}
    assert Session.sent == ["Bearer old", "Bearer new"]


def test_status_explains_an_unmeasured_memory(monkeypatch, capsys):
    """TorchServe fills a worker's memoryUsage once a minute: until then the table shows - and says why."""
    from argparse import Namespace
    from eden_client import ops_cli
    worker = {"id": "9000", "status": "READY", "pid": 1, "gpu": False, "gpuId": None, "gpuUsage": "N/A",
              "memoryUsage": 0, "startTime": "t"}
    model = {"model": "eden_encoder", "version": "1.0", "default": True, "minWorkers": 1, "maxWorkers": 1,
             "batchSize": 1, "maxBatchDelay": 10, "deviceType": "cpu", "deviceIds": None, "pendingRequests": 0,
             "requestsServed": 0, "workers": [worker]}
    status = {"servers": [{"label": "", "management_url": "m", "health": "Healthy", "models": [model]}]}
    monkeypatch.setattr(ops_cli, "collect_status", lambda servers: status)
    monkeypatch.setattr(ops_cli, "servers_of", lambda args: [])
    ops_cli.cmd_status(Namespace(json=False, wait=None))
    out = capsys.readouterr().out
    assert "MEMORY -: not measured yet" in out and "once a minute" in out
    worker["memoryUsage"] = 300 * 2**20
    ops_cli.cmd_status(Namespace(json=False, wait=None))
    out = capsys.readouterr().out
    assert "300 MiB" in out and "not measured" not in out


def test_status_wait_polls_until_the_workers_are_ready(monkeypatch, capsys):
    from argparse import Namespace
    from eden_client import ops_cli
    states = iter([ServeError("cannot reach TorchServe's management API"), "LOADING", "READY"])

    def collect(servers):
        state = next(states)
        if isinstance(state, Exception):
            raise state
        worker = {"id": "9000", "status": state, "pid": 1, "gpu": False, "gpuId": None, "gpuUsage": "N/A",
                  "memoryUsage": 1, "startTime": "t"}
        return {"servers": [{"label": "", "management_url": "m", "health": "Healthy", "models": [
            {"model": "eden_encoder", "version": "1.0", "default": True, "minWorkers": 1, "maxWorkers": 1,
             "batchSize": 1, "maxBatchDelay": 10, "deviceType": "cpu", "deviceIds": None, "pendingRequests": 0,
             "requestsServed": 0, "workers": [worker]}]}]}

    monkeypatch.setattr(ops_cli, "collect_status", collect)
    monkeypatch.setattr(ops_cli, "servers_of", lambda args: [])
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert ops_cli.cmd_status(Namespace(json=False, wait=60)) == 0
    assert "1/1 ready" in capsys.readouterr().out
    monkeypatch.setattr(ops_cli, "collect_status", lambda servers: (_ for _ in ()).throw(ServeError("down")))
    with pytest.raises(ServeError, match="not ready after 0 s: down"):
        ops_cli.cmd_status(Namespace(json=False, wait=0))


# ---------------------------------------------------------------------- status
def test_status_json_matches_the_management_api(ops_server):
    r = run_client("status", "--json", *status_args(ops_server))
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    (server,) = status["servers"]
    assert server["health"] == "Healthy"
    got = {(m["model"], m["version"]): m for m in server["models"]}
    for name in MODELS:
        described = raw(ops_server, f"/models/{name}/all").json()
        for d in described:
            m = got[(name, d["modelVersion"])]
            for key in ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay"):
                assert m[key] == d[key]
            assert m["pendingRequests"] == d["jobQueueStatus"]["pendingRequests"]
            assert [(w["id"], w["pid"], w["status"], w["gpu"]) for w in m["workers"]] == \
                [(w["id"], w["pid"], w["status"], w["gpu"]) for w in d["workers"]]


def test_status_table_shows_every_worker_and_requests_served(ops_server):
    client = EdenClient.connect(ops_server.inference_url, encoder_keys=keys_of(ops_server))
    interpolate_fixture(client)
    r = run_client("status", *status_args(ops_server))
    assert r.returncode == 0, r.stderr
    table = r.stdout
    assert "health: Healthy" in table
    served = parse_prometheus(requests.get(f"{ops_server.metrics_url}/metrics", timeout=10).text)
    for name in MODELS:
        d = raw(ops_server, f"/models/{name}").json()[0]
        line = next(l for l in table.splitlines() if l.split()[:2] == [name, d["modelVersion"]])
        n = int(sum(v for lab, v in served["ts_inference_requests_total"] if lab["model_name"] == name))
        assert n >= 1 and line.split()[-1] == str(n)  # SERVED
        assert f"{len(d['workers'])}/{len(d['workers'])} ready" in line
        for w in d["workers"]:
            assert any(l.split()[:5] == [name, d["modelVersion"], w["id"], w["status"], str(w["pid"])]
                       for l in table.splitlines()), table


# ---------------------------------------------------------------------- scaling
def test_scale_up_and_down(ops_server, mgmt):
    r = run_client("scale", "eden_encoder", "--workers", 2, *args_for(ops_server))
    assert r.returncode == 0, r.stderr
    d = raw(ops_server, "/models/eden_encoder").json()[0]
    assert len(d["workers"]) == 2 and all(w["status"] == "READY" for w in d["workers"])
    assert (d["minWorkers"], d["maxWorkers"]) == (2, 2)
    assert "2 worker(s) READY" in r.stdout
    status = collect_status([Server(ops_server.management_url, None, None, ops_server.key_file)])
    enc = next(m for m in status["servers"][0]["models"] if m["model"] == "eden_encoder" and m["default"])
    assert len(enc["workers"]) == 2
    desc = mgmt.scale("eden_encoder", min_workers=1, max_workers=1)
    assert len(desc["workers"]) == 1
    assert len(raw(ops_server, "/models/eden_encoder").json()[0]["workers"]) == 1


@pytest.mark.parametrize("args, message", [
    (["scale", "eden_nothing", "--workers", 1], "model eden_nothing is not registered"),
    (["scale", "eden_encoder", "--workers", -1], "--workers must be a whole number >= 0"),
    (["scale", "eden_encoder", "--min", 3, "--max", 2], "--min (3) is above --max (2)"),
    (["scale", "eden_encoder"], "nothing to do"),
])
def test_scale_refuses_nonsense(ops_server, args, message):
    r = run_client(*args, *args_for(ops_server))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(raw(ops_server, "/models/eden_encoder").json()[0]["workers"]) == 1


# ---------------------------------------------------------------------- versions
def test_register_set_default_and_unregister_a_version(ops_server, ops_store, tiny_weights, mgmt):
    build(tiny_weights, ops_store, gpus=0, max_batch_delay_ms=50, version="2.0", settings=TEST_SETTINGS,
          side="ditdec", versioned_names=True)
    assert (ops_store / "eden_ditdec-2.0.mar").is_file() and (ops_store / "eden_ditdec.mar").is_file()
    r = run_client("models", "register", "eden_ditdec-2.0.mar", *args_for(ops_server))
    assert r.returncode == 0, r.stderr
    versions = {d["modelVersion"] for d in raw(ops_server, "/models/eden_ditdec/all").json()}
    assert versions == {"1.0", "2.0"}
    assert raw(ops_server, "/models/eden_ditdec").json()[0]["modelVersion"] == "1.0"

    r = run_client("models", "set-default", "eden_ditdec", "2.0", *args_for(ops_server))
    assert r.returncode == 0, r.stderr
    assert raw(ops_server, "/models/eden_ditdec").json()[0]["modelVersion"] == "2.0"
    listed = json.loads(run_client("models", "list", "--json", *args_for(ops_server)).stdout)
    assert {(x["model"], x["version"], x["default"]) for x in listed} == \
        {("eden_encoder", "1.0", True), ("eden_ditdec", "1.0", False), ("eden_ditdec", "2.0", True)}
    client = EdenClient.connect(ops_server.inference_url, encoder_keys=keys_of(ops_server))
    assert np.abs(interpolate_fixture(client).astype(int) - official_frame()).max() <= 1  # served by 2.0

    r = run_client("models", "unregister", "eden_ditdec", "1.0", *args_for(ops_server))
    assert r.returncode == 0, r.stderr
    assert [d["modelVersion"] for d in raw(ops_server, "/models/eden_ditdec/all").json()] == ["2.0"]
    r = run_client("models", "unregister", "eden_ditdec", "7.0", *args_for(ops_server))
    assert r.returncode == 1 and "version 7.0 of model eden_ditdec is not registered" in r.stderr
    assert np.abs(interpolate_fixture(client).astype(int) - official_frame()).max() <= 1


@pytest.mark.parametrize("url", ["https://example.com/eden_ditdec.mar", "file:///etc/eden_ditdec.mar",
                                 "file:///tmp/../etc/passwd"])
def test_registering_from_outside_the_model_store_is_refused(ops_server, url):
    r = run_client("models", "register", url, *args_for(ops_server))
    assert r.returncode == 1
    assert f"TorchServe refused {url}: only archives in its model store are allowed" in r.stderr, r.stderr


def test_registration_is_off_by_default(server):
    """The session server runs config.properties as it is: enable_model_api=false."""
    r = run_client("models", "register", "eden_encoder.mar", "--management-url", server.management_url,
                   "--key-file", server.key_file)
    assert r.returncode == 1 and "registration through the management API is off" in r.stderr, r.stderr
    assert raw(server, "/models?url=eden_encoder.mar", method="POST").status_code == 405


# ---------------------------------------------------------------------- keys
def test_missing_or_wrong_management_key_is_refused_with_a_hint(ops_server, tmp_path):
    r = requests.get(f"{ops_server.management_url}/models", timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    r = raw(ops_server, "/models", key="wrong")
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"

    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "nope"}, "management": {"key": "nope"}}))
    with pytest.raises(ServeError, match=r"refused the management key of .*key_file.json .* --key-file"):
        ManagementClient(ops_server.management_url, KeySource(key_file=wrong)).models()
    r = run_client("status", "--management-url", ops_server.management_url, "--key-file", wrong)
    assert r.returncode == 1 and "refused the management key" in r.stderr and "--key-file" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_client("scale", "eden_encoder", "--workers", 1, "--management-url", ops_server.management_url,
                   cwd=tmp_path / "empty")
    assert r.returncode == 1 and "no management key: key_file.json does not exist" in r.stderr, r.stderr


def test_metrics_of_the_handlers_are_exported(ops_server, server):
    """Declared metrics (deploy/metrics.yaml) on ops_server, auto-detected ones (config.properties) on server."""
    for ts in (ops_server, server):
        client = EdenClient.connect(ts.inference_url, encoder_keys=keys_of(ts))
        interpolate_fixture(client)
        deadline = time.monotonic() + 20
        while True:
            m = parse_prometheus(requests.get(f"{ts.metrics_url}/metrics", timeout=10).text)
            names = {"eden_encode_seconds_count", "eden_denoise_seconds_count", "eden_decode_seconds_count",
                     "eden_token_bytes_out_total", "eden_token_bytes_in_total", "eden_batch_size",
                     "eden_batches_total", "ts_inference_requests_total"}
            if names <= set(m) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert names <= set(m), sorted(set(m))
        by_model = {lab["ModelName"]: v for lab, v in m["eden_encode_seconds_count"]}
        assert by_model["eden_encoder"] >= 1
        assert {lab["ModelName"] for lab, _ in m["eden_denoise_seconds_count"]} == {"eden_ditdec"}
        out = sum(v for lab, v in m["eden_token_bytes_out_total"])
        tokens_in = sum(v for lab, v in m["eden_token_bytes_in_total"])
        assert out > 0 and tokens_in > 0


def test_an_expired_key_is_renewed_not_a_failure(expiring_server):
    """A server with 1-minute keys that nobody has used since it started (in the background when this module
    began): wait until its inference key has expired, check TorchServe refuses it, then the client (given the
    management URL) renews it with the API key and goes on; the management key likewise."""
    ts = expiring_server()
    keys = ts.keys()
    old = keys["inference"]["key"]
    wait = max(expiry_time(keys[k]["expiration time"]).timestamp() for k in ("inference", "management"))
    assert wait - time.time() < 65
    time.sleep(max(0.0, wait - time.time() + 1))
    r = requests.get(f"{ts.inference_url}/ping", headers={"Authorization": f"Bearer {old}"}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    r = requests.get(f"{ts.management_url}/models",
                     headers={"Authorization": f"Bearer {keys['management']['key']}"}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"

    client = EdenClient.connect(ts.inference_url, encoder_keys=keys_of(ts))
    blob = client.encode([(FIXTURE / f"frame{i}.png").read_bytes() for i in (0, 1)])
    assert blob[:8] == b"EDENTOKS"
    assert ts.keys()["inference"]["key"] != old
    # the command line renews the management key it needs through its --management-url the same way
    r = run_client("models", "list", *args_for(ts))
    assert r.returncode == 0 and "eden_encoder" in r.stdout, r.stderr
    assert ts.keys()["management"]["key"] != keys["management"]["key"]


# ---------------------------------------------------------------------- two hosts
@pytest.fixture(scope="module")
def two_servers(tiny_weights, tmp_path_factory):
    """The encoder and the DiT+decoder on two TorchServe instances, each built with --side and loading one model."""
    servers = []
    try:
        for side in ("encoder", "ditdec"):
            store = tmp_path_factory.mktemp(f"store_{side}")
            build(tiny_weights, store, gpus=0, max_batch_delay_ms=50, settings=TEST_SETTINGS, side=side)
            assert [p.name for p in store.glob("*.mar")] == [f"eden_{side}.mar"]
            servers.append(TorchServe(tmp_path_factory.mktemp(f"serve_{side}"), store, models=[f"eden_{side}.mar"],
                                      extra_config=grpc_ports()).start())
        yield servers
    finally:
        for ts in servers:
            ts.stop()


def test_two_instances_one_model_each(two_servers, tmp_path):
    enc, dec = two_servers
    assert [m["modelName"] for m in raw(enc, "/models").json()["models"]] == ["eden_encoder"]
    assert [m["modelName"] for m in raw(dec, "/models").json()["models"]] == ["eden_ditdec"]
    out = tmp_path / "middle.png"
    r = run_client("pair", FIXTURE / "frame0.png", FIXTURE / "frame1.png", "-o", out, "--seed", 0,
                   "--encoder-url", enc.inference_url, "--ditdec-url", dec.inference_url,
                   "--key-file", enc.key_file, "--ditdec-key-file", dec.key_file,
                   "--transport", "http")  # (no transport probes: the count below is the pair's own request)
    assert r.returncode == 0, r.stderr
    assert np.abs(read_rgb(out).astype(int) - official_frame()).max() <= 1

    both = ["--management-url", enc.management_url, "--key-file", enc.key_file,
            "--ditdec-management-url", dec.management_url, "--ditdec-key-file", dec.key_file]
    r = run_client("status", "--json", *both, "--inference-url", enc.inference_url, "--metrics-url",
                   enc.metrics_url, "--ditdec-inference-url", dec.inference_url, "--ditdec-metrics-url",
                   dec.metrics_url)
    assert r.returncode == 0, r.stderr
    servers = json.loads(r.stdout)["servers"]
    assert [(s["management_url"], [m["model"] for m in s["models"]], s["health"]) for s in servers] == \
        [(enc.management_url, ["eden_encoder"], "Healthy"), (dec.management_url, ["eden_ditdec"], "Healthy")]
    assert servers[1]["models"][0]["requestsServed"] == 1
    r = run_client("scale", "eden_ditdec", "--workers", 1, *both)  # goes to the DiT+decoder's server
    assert r.returncode == 0 and "eden_ditdec 1.0: 1 worker(s) READY" in r.stdout, r.stderr
    assert "DiT+decoder" in format_status(collect_status([
        Server(enc.management_url, None, None, enc.key_file, "encoder"),
        Server(dec.management_url, None, None, dec.key_file, "DiT+decoder")]))
