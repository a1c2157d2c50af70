"""The connection flags of pair, video and batch (URLs, keys, transport), and the EdenClient they describe."""
from __future__ import annotations

import argparse

from .api import EdenClient
from .errors import ServeError
from .keys import KEY_ENV, KEY_FILE_ENV, KeySource
from .model_client import DEFAULT_URL
from .transport import TRANSPORTS


def add_connection_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--encoder-url", default=DEFAULT_URL, help=f"TorchServe serving eden_encoder ({DEFAULT_URL})")
    ap.add_argument("--ditdec-url", default=None, help="TorchServe serving eden_ditdec (default: --encoder-url)")
    ap.add_argument("--key-file", default=None,
                    help="TorchServe's key_file.json (default: $EDEN_KEY_FILE, else ./key_file.json; "
                         "$EDEN_INFERENCE_KEY gives a key directly)")
    ap.add_argument("--ditdec-key-file", default=None, help="key file of the DiT+decoder's TorchServe, if another")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds to wait for each request before trying again (default: %(default)s)")
    ap.add_argument("--transport", choices=TRANSPORTS, default="auto",
                    help="auto (default): shared memory when both servers prove, by a probe segment, that they share "
                         "a folder with this client (same host), HTTP otherwise; shm: shared memory without the "
                         "check; http: frames and tokens in the requests (works across hosts)")
    ap.add_argument("--handoff", choices=["device", "host"], default="device",
                    help="with shared memory: device (default) lets an encoder on a GPU keep the tokens there and "
                         "the DiT+decoder copy them GPU to GPU; host puts their bytes in shared memory")
    ap.add_argument("--shm-dir", default=None,
                    help="shared-memory folder (default: the one the servers name, usually /dev/shm/eden)")
    ap.add_argument("--shm-group", default=None,
                    help="the servers' shm_group, when client and servers run as different users of one group "
                         "(the folder is then 0770; otherwise it must be 0700 and this user's)")
    ap.add_argument("--no-frame-cache", action="store_true",
                    help="over HTTP: send both frames' tokens with every pair, instead of each frame once and by "
                         "hash after (the DiT+decoder's frame cache; docs/tokens-across-hosts.md)")


def check_keys(*sources: KeySource) -> None:
    """Before any request: each key can be read (the key file exists and is one), so a missing key file is the
    first thing said, not a refusal after the first requests."""
    for keys in sources:
        if keys.read("inference") is None:
            raise ServeError(f"no key: {keys.key_file} does not exist. TorchServe writes key_file.json in the folder "
                             f"it was started from: pass it with --key-file or ${KEY_FILE_ENV}, or the key itself "
                             f"in ${KEY_ENV}")


def connect(args) -> EdenClient:
    """The client the connection flags describe; with --transport auto this asks both models
    (eden_client/transport.py)."""
    enc_keys = KeySource.default(args.key_file)
    dec_keys = KeySource.default(args.ditdec_key_file) if args.ditdec_key_file else enc_keys
    check_keys(enc_keys, dec_keys)
    client = EdenClient.connect(args.encoder_url, args.ditdec_url, enc_keys, dec_keys, args.timeout,
                                transport=args.transport, shm_dir=args.shm_dir, handoff=args.handoff,
                                shm_group=args.shm_group)
    if getattr(args, "no_frame_cache", False):
        client.frame_refs = False
    return client
