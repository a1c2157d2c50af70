"""--transport auto: shared memory only where the servers prove they share a folder with the client, else HTTP."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, read_rgb

from eden_client.api import EdenClient
from eden_client.keys import KeySource
from eden_client.transport import choose
from eden_dev import clips


# ---------------------------------------------------------------------- against the real TorchServe
@pytest.fixture(scope="module")
def keys(server):
    return KeySource(key_file=server.key_file)


@pytest.mark.server
def test_auto_finds_the_servers_folder(server, keys, shm_dir):
    def segments():
        return {p.name for p in shm_dir.iterdir() if p.name.startswith(("eden-", ".eden-"))}
    before = segments()  # (segments of earlier tests, e.g. a client killed mid-run, wait there for their expiry)
    client = EdenClient.connect(server.inference_url, encoder_keys=keys, transport="auto")
    assert client.transport == "shm" and str(client.store.root) == str(shm_dir)
    assert client.handoff == "host"  # CPU workers: nothing to hand off on a GPU
    assert "probe segments in" in client.reason and "encoder runs on cpu" in client.reason
    assert not segments() - before  # probes removed


@pytest.mark.server
def test_auto_takes_http_when_the_folder_is_not_shared(server, keys, tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    choice = choose(*EdenClient.connect(server.inference_url, encoder_keys=keys).models(), shm_dir=str(other))
    assert choice.transport == "http" and "no shared memory with the servers" in choice.reason
    assert "does not exist" in choice.reason  # the server looked for the client's segment in its own folder
    assert not list(other.iterdir())


@pytest.mark.server
def test_auto_refuses_a_folder_of_others(server, keys, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    choice = choose(*EdenClient.connect(server.inference_url, encoder_keys=keys).models(), shm_dir=str(loose))
    assert choice.transport == "http" and "has mode 0777" in choice.reason and "refusing to use it" in choice.reason


def run_client(*args, prefix=()):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*prefix, sys.executable, "-m", "eden_client", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.server
def test_video_without_a_transport_flag_uses_shared_memory_and_http_elsewhere(server, shm_dir, tmp_path):
    """The CLI with no transport flag: shared memory next to the servers; from "another host" (a private mount
    namespace whose folder of that name is another tmpfs, as on another machine) HTTP; the same frames."""
    folder = tmp_path / "in"
    clips.write_frame_folder(folder, clips.clip_frames(5, 48, 64))
    conn = ["--encoder-url", server.inference_url, "--key-file", server.key_file, "--fps", "25"]
    r = run_client("video", folder, "-o", tmp_path / "here", "--stats-json", tmp_path / "here.json", *conn)
    assert r.returncode == 0, r.stderr
    here = json.loads((tmp_path / "here.json").read_text())
    assert here["transport"].startswith("shm") and "transport: shm" in r.stdout

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"]).returncode != 0:
        pytest.skip("no mount namespaces here (unshare)")
    # in its own mount namespace the client sees an empty tmpfs where the servers' folder is
    script = (f"mount -t tmpfs -o mode=700 eden-elsewhere {shm_dir} && exec \"$@\"")
    r = run_client("video", folder, "-o", tmp_path / "away", "--stats-json", tmp_path / "away.json", *conn,
                   prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"))
    assert r.returncode == 0, r.stderr
    away = json.loads((tmp_path / "away.json").read_text())
    reason = away["transport"]
    assert reason.startswith("http") and ("read another segment" in reason or "does not exist" in reason), reason
    a, b = sorted((tmp_path / "here").iterdir()), sorted((tmp_path / "away").iterdir())
    assert len(a) == len(b) == 9
    assert all(np.array_equal(read_rgb(x), read_rgb(y)) for x, y in zip(a, b))
