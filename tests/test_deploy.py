"""The container recipes and Kubernetes manifests of deploy/: parsed, required fields present, ports, paths and
model names consistent with each other and with config.properties; the forwarder and health check of the images
run for real against the session's TorchServe."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
import yaml
from conftest import FIXTURE, ROOT, read_rgb
from helpers_http import keyproxy_running

from eden_client.api import EdenClient
from eden_client.errors import ServeError
from eden_client.keys import KeySource
from eden_serve import images, protocol, serving

DEPLOY = ROOT / "deploy"
SIDES = ("encoder", "ditdec")
PROXY_PORT, METRICS_PORT = 8090, 8082


def properties(path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def dockerfile(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l.strip() else "")
            for l in text.splitlines() if l.strip()]


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "eden.yaml").read_text()) if d]


def java_regex_matches(pattern: str, text: str) -> bool:
    """config.properties escapes backslashes; the regex TorchServe sees has single ones (close enough to Java's)."""
    return re.fullmatch(pattern.replace("\\\\", "\\"), text) is not None


# ---------------------------------------------------------------------- per-side TorchServe configs
@pytest.mark.parametrize("side", SIDES)
def test_side_config_is_safe_and_consistent(side):
    cfg = properties(DEPLOY / side / "config.properties")
    base = properties(ROOT / "config.properties")
    assert cfg["load_models"] == f"eden_{side}.mar"
    assert cfg["inference_address"] == "http://127.0.0.1:8080"
    assert cfg["management_address"] == "http://127.0.0.1:8081"
    assert cfg["metrics_address"].endswith(f":{METRICS_PORT}")
    assert cfg["grpc_inference_address"] == cfg["grpc_management_address"] == "127.0.0.1"
    for key in ("disable_token_authorization", "token_expiration_min", "enable_model_api", "max_request_size",
                "max_response_size", "install_py_dep_per_model", "metrics_mode", "enable_envvars_config"):
        assert cfg[key] == base[key], key
    assert cfg["disable_token_authorization"] == "false" and cfg["enable_model_api"] == "false"
    store = cfg["model_store"]
    assert java_regex_matches(cfg["allowed_urls"], f"file://{store}/eden_{side}.mar")
    for outside in ("https://example.com/eden_encoder.mar", "file:///etc/passwd", f"file://{store}/../x.mar",
                    f"file://{store}/sub/x.mar"):
        assert not java_regex_matches(cfg["allowed_urls"], outside), outside
    assert cfg["metrics_config"] == "/opt/eden/deploy/metrics.yaml"


def test_body_limits_equal_the_protocols():
    """config.properties files keep TorchServe's body limits as literal numbers: they must be the protocol's."""
    paths = [ROOT / "config.properties", *sorted(DEPLOY.glob("*/config.properties"))]
    assert {p.parent.name for p in paths[1:]} >= set(SIDES)
    for path in paths:
        cfg = properties(path)
        for key in ("max_request_size", "max_response_size"):
            assert int(cfg[key]) == protocol.MAX_BODY_BYTES, (path, key)
    assert serving.Settings().max_response_bytes == protocol.MAX_BODY_BYTES


def test_protocol_module_imports_nothing_heavy():
    code = ("import sys; import eden_serve.protocol; "
            "heavy = sorted(m for m in ('torch', 'numpy', 'PIL', 'requests') if m in sys.modules); print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_forwarder_passes_the_protocols_remote_headers():
    import importlib.util
    spec = importlib.util.spec_from_file_location("keyproxy", DEPLOY / "keyproxy.py")
    keyproxy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(keyproxy)
    assert set(keyproxy.FORWARD_HEADERS) == {h.lower() for h in protocol.REMOTE_REQUEST_HEADERS}
    assert protocol.FORMAT.lower() in keyproxy.FORWARD_HEADERS and protocol.SEED.lower() in keyproxy.FORWARD_HEADERS
    assert not {h.lower() for h in protocol.SAME_HOST_HEADERS} & set(keyproxy.FORWARD_HEADERS)
    assert keyproxy.MAX_BODY == protocol.MAX_BODY_BYTES


def test_root_config_security_defaults():
    cfg = properties(ROOT / "config.properties")
    for key in ("inference_address", "management_address", "metrics_address"):
        assert cfg[key].startswith("http://127.0.0.1:"), key
    assert cfg["disable_token_authorization"] == "false" and cfg["token_expiration_min"] == "60"
    assert cfg["enable_model_api"] == "false" and cfg["metrics_mode"] == "prometheus"
    for url in ("file:///srv/eden/model_store/eden_encoder.mar", "file:///tmp/x/model_store/eden_encoder.mar",
                "https://example.com/model_store/eden_encoder.mar", "eden_encoder.mar", ""):
        assert not java_regex_matches(cfg["allowed_urls"], url), url  # only plain names, from the store itself


def test_metrics_yaml_declares_every_handler_metric():
    spec = yaml.safe_load((DEPLOY / "metrics.yaml").read_text())
    declared = {m["name"]: (kind, m["dimensions"]) for kind, ms in spec["model_metrics"].items() for m in ms}
    names = {*serving.METRIC_STAGE_SECONDS.values(), serving.METRIC_BATCH_SIZE, serving.METRIC_BATCHES,
             serving.METRIC_BATCHED_REQUESTS, serving.METRIC_REQUEST_BYTES, serving.METRIC_RESPONSE_BYTES,
             serving.METRIC_TOKEN_BYTES_IN, serving.METRIC_TOKEN_BYTES_OUT}
    for name in names:
        assert declared[name][1] == ["ModelName", "Level"], name
    assert all(declared[n][0] == "histogram" for n in serving.METRIC_STAGE_SECONDS.values())
    assert {"ts_inference_requests_total", "QueueTime"} <= {m["name"] for ms in spec["ts_metrics"].values()
                                                             for m in ms}


# ---------------------------------------------------------------------- images
@pytest.mark.parametrize("side", SIDES)
def test_dockerfile(side):
    steps = dockerfile(DEPLOY / side / "Dockerfile")
    kinds = [k for k, _ in steps]
    args = {k: [a for kk, a in steps if kk == k] for k in kinds}
    assert any("nvidia/cuda:" in a for a in args["ARG"]) and args["FROM"] == ["${BASE_IMAGE}"]
    user = args["USER"][-1].split(":")[0]
    assert user not in ("0", "root") and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN"
                                                                  and "apt-get" in steps[i][1])
    assert any(f"EDEN_SIDE={side}" in a for a in args["ENV"])
    assert any(f"model_store/eden_{side}.mar /home/model-server/model-store/" in a for a in args["COPY"])
    assert any(a.split()[0] == "deploy/" for a in args["COPY"])
    assert {str(PROXY_PORT), str(METRICS_PORT)} <= set(" ".join(args["EXPOSE"]).split())
    (health,) = args["HEALTHCHECK"]
    assert "/opt/eden/deploy/healthcheck.py" in health and f"eden_{side}" in health
    assert args["ENTRYPOINT"] == ['["/opt/eden/deploy/entrypoint.sh"]']
    ignore = (DEPLOY / side / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and f"!model_store/eden_{side}.mar" in ignore


def test_entrypoint_script():
    text = (DEPLOY / "entrypoint.sh").read_text()
    assert subprocess.run(["bash", "-n", str(DEPLOY / "entrypoint.sh")]).returncode == 0
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK) and os.access(DEPLOY / "keyproxy.py", os.X_OK)
    assert "/opt/eden/deploy/$EDEN_SIDE/config.properties" in text
    assert f"--listen 0.0.0.0:{PROXY_PORT}" in text and "EDEN_PROXY_SECRET" in text


# ---------------------------------------------------------------------- Kubernetes
def test_kubernetes_manifests():
    docs = manifests()
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    for side in SIDES:
        assert ("Deployment", f"eden-{side}") in kinds and ("Service", f"eden-{side}") in kinds
    assert ("NetworkPolicy", "eden-ingress") in kinds
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for side in SIDES:
        dep, svc = deployments[f"eden-{side}"], services[f"eden-{side}"]
        assert dep["apiVersion"] == "apps/v1" and dep["metadata"]["namespace"] == svc["metadata"]["namespace"]
        spec = dep["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in spec["selector"]["matchLabels"].items())
        assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        assert f"eden-{side}" in c["image"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http-infer": PROXY_PORT, "metrics": METRICS_PORT}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
        assert {p["port"] for p in svc["spec"]["ports"]} == {PROXY_PORT, METRICS_PORT}
        env = {e["name"]: e for e in c["env"]}
        assert env["EDEN_PROXY_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "eden-proxy-secret"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "/opt/eden/deploy/healthcheck.py" in c[probe]["exec"]["command"]
        assert f"eden_{side}" in c["readinessProbe"]["exec"]["command"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/home/model-server/run", "/tmp"} <= mounts
        assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(METRICS_PORT)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    rules = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    assert "from" in rules[METRICS_PORT] and set(rules) == {PROXY_PORT, METRICS_PORT}


# ---------------------------------------------------------------------- the forwarder and health check, for real
@pytest.fixture(scope="module")
def keyproxy(server):
    secret = "s3cret-" + "x" * 20
    with keyproxy_running(server.inference_url, server.key_file, secret, "--management", server.management_url) as url:
        yield url, secret


@pytest.mark.server
def test_keyproxy_forwards_with_the_shared_secret_only(keyproxy):
    url, secret = keyproxy
    client = EdenClient.connect(url, encoder_keys=KeySource(key=secret))
    frames = [(FIXTURE / f"frame{i}.png").read_bytes() for i in (0, 1)]
    got = read_rgb(client.interpolate(*frames, seed=0)).astype(int)
    assert np.abs(got - read_rgb(FIXTURE / "expected.png").astype(int)).max() <= 1
    r = requests.post(f"{url}/predictions/eden_encoder", files={"frame0": frames[0]}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    with pytest.raises(ServeError, match="TorchServe refused the key in"):
        EdenClient.connect(url, encoder_keys=KeySource(key="wrong")).encode([frames[0]])
    r = requests.get(f"{url}/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert r.status_code == 404  # management never goes through the forwarder
    r = requests.post(f"{url}/predictions/eden_ditdec", data=b'EDENREF1{"segment":"eden-' + b"0" * 32 + b'"}',
                      headers={"Authorization": f"Bearer {secret}"}, timeout=30)
    assert r.status_code == 400 and "shared-memory references" in r.json()["message"]


def test_raw_frames_through_the_forwarder(keyproxy):
    """X-Eden-Format crosses the forwarder: a DiT+decoder asked for a raw frame answers one (not PNG), the same
    pixels as the PNG answer for the same seed, and the client's HTTP path (generate_array) gets them."""
    url, secret = keyproxy
    client = EdenClient.connect(url, encoder_keys=KeySource(key=secret))
    frames = [(FIXTURE / f"frame{i}.png").read_bytes() for i in (0, 1)]
    blob = client.encode(frames)
    auth = {"Authorization": f"Bearer {secret}", protocol.CONTENT_TYPE: protocol.TOKENS_CONTENT_TYPE,
            protocol.SEED: "0"}
    raw = requests.post(f"{url}/predictions/eden_ditdec", data=blob, timeout=60,
                        headers={**auth, protocol.FORMAT: protocol.FORMAT_RAW})
    assert raw.status_code == 200, raw.text[:300]
    assert raw.headers["Content-Type"].split(";")[0] == protocol.RAW_FRAME_CONTENT_TYPE
    assert raw.headers[protocol.SEED] == "0"
    got = images.decode_raw(raw.content, max_pixels=1 << 30)
    png = requests.post(f"{url}/predictions/eden_ditdec", data=blob, headers=auth, timeout=60)
    assert png.status_code == 200 and png.headers["Content-Type"].split(";")[0] == protocol.PNG_CONTENT_TYPE
    assert np.array_equal(got, read_rgb(png.content))
    frame, seed = client.generate_array(blob, seed=0)
    assert seed == 0 and np.array_equal(frame, got)


@pytest.mark.server
def test_healthcheck(server, tmp_path):
    def check(*args):
        return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "--inference-url",
                               server.inference_url, "--management-url", server.management_url, *map(str, args)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    r = check("--key-file", server.key_file, "--model", "eden_encoder")
    assert r.returncode == 0 and "healthy" in r.stdout, r.stdout + r.stderr
    r = check("--key-file", tmp_path / "none.json")
    assert r.returncode == 1 and "no " in r.stdout
