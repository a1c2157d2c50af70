"""The client needs no torch: it imports, prints its help and interpolates a pair with torch made unimportable.
The developer tooling (eden_dev: the demo, the TorchServe launcher, generated clips) is not part of it."""
import subprocess
import sys

import numpy as np
from conftest import FIXTURE, ROOT, read_rgb

NO_TORCH = "import sys; sys.modules['torch'] = None; "  # any `import torch` now fails


def run(code: str, *args):
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


# every module of the package (a new one is covered too), then which of PyAV, Ray and eden_dev came with them
IMPORT_ALL = ("import importlib, pkgutil, eden_client; "
              "names = [m.name for m in pkgutil.iter_modules(eden_client.__path__, 'eden_client.') "
              "if m.name != 'eden_client.__main__']; "
              "[importlib.import_module(n) for n in names]; "
              "print('modules', *names); print('loaded', [m for m in ('av', 'ray', 'eden_dev') if m in sys.modules]); ")


def test_commands_import_and_help_without_torch():
    r = run("import sys; " + IMPORT_ALL + "from eden_client.cli import main; sys.argv[0] = 'eden-client'; "
            "main(['video', '--help'])")
    assert r.returncode == 0, r.stderr
    modules = set(r.stdout.split("\n")[0].split()[1:])
    expected = ("cli", "video", "convert", "batch", "transport", "ops_cli", "cluster")
    assert {f"eden_client.{m}" for m in expected} <= modules, modules
    assert "loaded []" in r.stdout  # PyAV and Ray on first use only; no developer tooling
    assert "--transport {auto,shm,http}" in r.stdout and "auto (default)" in r.stdout


def test_pair_without_torch(server, tmp_path):
    out = tmp_path / "middle.png"
    r = run("import sys; from eden_client.cli import main; sys.exit(main(sys.argv[1:]))", "pair",
            FIXTURE / "frame0.png", FIXTURE / "frame1.png", "-o", out, "--seed", 0, "--encoder-url",
            server.inference_url, "--key-file", server.key_file)
    assert r.returncode == 0, r.stderr
    assert read_rgb(out).shape == read_rgb(FIXTURE / "frame0.png").shape and np.asarray(read_rgb(out)).std() > 0
