"""Which transport a client uses: shared memory when it shares a folder with both servers, HTTP otherwise.

``--transport auto`` (the CLI's default) decides by asking each model, never by the URL alone:

1. ``{"probe": null}``: the server answers where it keeps shared-memory segments (its ``shm_dir``), its host and
   device, and whether it takes part in the device handoff;
2. the client writes a segment of random bytes in that folder (or in ``--shm-dir``) and sends ``{"probe": NAME}``:
   the server answers the hash of what it read there and writes the same hash to a new segment, which the client
   reads back. Both directions work only when client and server really see one folder (same host, or the same
   memory-backed volume), whatever the URL says.

A client on another host, behind the key-checking proxy (which refuses references), against a server with shm off,
or whose folder is not private (``ShmStore.check_dir``: a link, another user's, writable by others) gets HTTP, and ``Choice.reason`` says why. Tokens stay on the GPU (the
device handoff) when both models said they can take part; where it fails anyway (containers without a shared IPC
namespace) the client falls back to host tokens by itself (eden_client/api.py).
"""
from __future__ import annotations

import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eden_serve.protocol import CONTENT_TYPE, HANDOFF_DEVICE, HANDOFF_HOST, REFERENCE_CONTENT_TYPE
from eden_serve.shm import ShmError, ShmStore, make_ref, probe_answer

TRANSPORTS = ("auto", "shm", "http")


@dataclass(frozen=True)
class Choice:
    transport: str  # "shm" or "http"
    handoff: str  # "device" or "host" (meaningful with shm)
    reason: str  # why, in words, for the summary line and --stats-json
    shm_dir: str | None = None



class ProbeFailed(Exception):
    """Shared memory cannot work with this server; the message says why."""


def memory_folder(path: Path) -> bool:
    """Whether ``path`` is where shared-memory folders live (under /dev/shm or the temporary folder): the only places
    a server's answer may make this client write its probe."""
    where = Path(os.path.abspath(path))
    return any(where.is_relative_to(root) for root in (Path("/dev/shm"), Path(tempfile.gettempdir()).resolve()))


def _ask(model, probe: str | None) -> dict:
    """One probe request to ``model`` (a ModelClient) -> its JSON answer; ProbeFailed if refused."""
    from .errors import ServeError
    try:
        r = model.predict(data=make_ref(probe=probe), headers={CONTENT_TYPE: REFERENCE_CONTENT_TYPE})
    except ServeError as e:
        if e.status == 0:  # no answer at all: the server is not there; the caller says so
            raise
        raise ProbeFailed(f"{model.model} refused the probe ({str(e).split(': ', 1)[-1][:160]})") from None
    try:
        answer = json.loads(r.content)
        if not isinstance(answer, dict):
            raise ValueError
    except ValueError:
        raise ProbeFailed(f"{model.model} does not answer probes (an older server, or a proxy in front)") from None
    return answer


def probe(model, shm_dir: str | None, group: str | None = None) -> tuple[str, dict]:
    """Whether ``model`` shares a folder with this client -> (that folder, the server's answer); else ProbeFailed."""
    info = _ask(model, None)
    folder = shm_dir or info.get("shm_dir")
    if not folder:
        raise ProbeFailed(f"{model.model} has the shared-memory transport off")
    if not isinstance(folder, str):
        raise ProbeFailed(f"{model.model} answered an invalid folder")
    if not shm_dir and not memory_folder(Path(folder)):  # a server never makes the client write elsewhere
        raise ProbeFailed(f"{model.model}'s shared-memory folder {folder} is not under /dev/shm or the temporary "
                          f"folder: pass --shm-dir {folder} to use it")
    store = ShmStore(folder, group=group)
    try:  # here, not created: a folder this client cannot see is not shared; one others can write is never used
        store.check_dir()
    except ShmError as e:
        raise ProbeFailed(f"cannot use {model.model}'s shared-memory folder: {e}") from None
    nonce = secrets.token_bytes(32)
    try:
        name = store.write(nonce)
    except OSError as e:
        raise ProbeFailed(f"cannot write to {folder}: {e.strerror}") from None
    reply = None
    try:
        answer = _ask(model, name)
        reply = answer.get("reply")
        if answer.get("probe") != probe_answer(nonce):
            raise ProbeFailed(f"{model.model} read another segment than this client wrote in {folder} "
                              f"(another host or another folder of that name)")
        try:
            back = bytes(store.read(reply))
        except ShmError:
            raise ProbeFailed(f"{model.model}'s reply segment is not in {folder} here") from None
        if back != answer["probe"].encode():
            raise ProbeFailed(f"{model.model}'s reply segment in {folder} holds something else")
    finally:
        store.unlink(name)
        if isinstance(reply, str):
            try:
                store.unlink(reply)
            except ShmError:
                pass
    return folder, info


def choose(encoder, ditdec, requested: str = "auto", handoff: str = HANDOFF_DEVICE, shm_dir: str | None = None,
           group: str | None = None) -> Choice:
    """The transport for an encoder and a DiT+decoder (ModelClients): ``requested`` "http" is taken as is; "shm"
    must pass the probe (else ProbeFailed); "auto" takes shared memory when both models pass it, HTTP if not."""
    if requested not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {requested!r}")
    if requested == "http":
        return Choice("http", handoff, "asked for with --transport http")
    try:
        enc_dir, enc = probe(encoder, shm_dir, group)
        dec_dir, dec = probe(ditdec, shm_dir or enc_dir, group)
        if dec_dir != enc_dir:
            raise ProbeFailed(f"the two models use different shared-memory folders ({enc_dir}, {dec_dir})")
    except ProbeFailed as e:
        if requested == "shm":
            raise
        return Choice("http", HANDOFF_HOST, f"no shared memory with the servers: {e}")
    both = "the servers read and wrote probe segments in " + enc_dir
    if handoff == HANDOFF_DEVICE and not (enc.get("handoff") and dec.get("handoff")):
        name, info = ("encoder", enc) if not enc.get("handoff") else ("DiT+decoder", dec)
        return Choice("shm", HANDOFF_HOST, f"{both}; no device handoff: the {name} runs on {info.get('device')}",
                      enc_dir)
    return Choice("shm", handoff, both, enc_dir)


