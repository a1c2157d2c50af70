"""The client needs no torch: it imports, prints its help and interpolates a pair with torch made unimportable."""
import subprocess
import sys

import numpy as np
from conftest import FIXTURE, ROOT, read_rgb

NO_TORCH = "import sys; sys.modules['torch'] = None; "  # any `import torch` now fails


def run(code: str, *args):
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_commands_import_and_help_without_torch():
    r = run("import sys; from eden_client.cli import main; import eden_client.video, eden_client.convert, "
            "eden_client.batch, eden_client.transport, eden_client.ops_cli; sys.argv[0] = 'eden-client'; "
            "main(['video', '--help'])")
    assert r.returncode == 0, r.stderr
    assert "--transport {auto,shm,http}" in r.stdout and "auto (default)" in r.stdout


def test_pair_without_torch(server, tmp_path):
    out = tmp_path / "middle.png"
    r = run("import sys; from eden_client.cli import main; sys.exit(main(sys.argv[1:]))", "pair",
            FIXTURE / "frame0.png", FIXTURE / "frame1.png", "-o", out, "--seed", 0, "--encoder-url",
            server.inference_url, "--key-file", server.key_file)
    assert r.returncode == 0, r.stderr
    assert read_rgb(out).shape == read_rgb(FIXTURE / "frame0.png").shape and np.asarray(read_rgb(out)).std() > 0
