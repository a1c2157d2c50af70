"""python -m client COMMAND ...

    pair FRAME0 FRAME1 -o OUT.png [--seed N]     the middle frame of two images
    video / batch                                 videos and folders of them (client/video_cli.py)
    status / scale / models                       operating the deployment (client/ops_cli.py)
    demo [--checkpoint eden.pt]                   the whole deployment on CPU, end to end (see client/demo.py)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from . import ops_cli, video_cli
from .api import DEFAULT_URL, KEY_ENV, KEY_FILE_ENV, EdenClient, KeySource, ServeError


def add_connection_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--encoder-url", default=DEFAULT_URL, help=f"TorchServe serving eden_encoder ({DEFAULT_URL})")
    ap.add_argument("--ditdec-url", default=None, help="TorchServe serving eden_ditdec (default: --encoder-url)")
    ap.add_argument("--key-file", default=None,
                    help="TorchServe's key_file.json (default: $EDEN_KEY_FILE, else ./key_file.json; "
                         "$EDEN_INFERENCE_KEY gives a key directly)")
    ap.add_argument("--ditdec-key-file", default=None, help="key file of the DiT+decoder's TorchServe, if another")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds to wait for each request before trying again (default: %(default)s)")
    ap.add_argument("--transport", choices=["auto", "shm", "http"], default="auto",
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
    """The client the connection flags describe; with --transport auto this asks both models (client/transport.py)."""
    enc_keys = KeySource.default(args.key_file)
    dec_keys = KeySource.default(args.ditdec_key_file) if args.ditdec_key_file else enc_keys
    check_keys(enc_keys, dec_keys)
    client = EdenClient.connect(args.encoder_url, args.ditdec_url, enc_keys, dec_keys, args.timeout,
                                transport=args.transport, shm_dir=args.shm_dir, handoff=args.handoff,
                                shm_group=args.shm_group)
    if getattr(args, "no_frame_cache", False):
        client.frame_refs = False
    return client


def cmd_pair(args) -> int:
    frames = []
    for path in (args.frame0, args.frame1):
        try:
            frames.append(Path(path).read_bytes())
        except OSError as e:
            print(f"client: cannot read {path}: {e.strerror or e}", file=sys.stderr)
            return 2
    client = connect(args)
    t0 = time.perf_counter()
    if client.transport == "http":  # the files as they are, the answer a PNG
        blob = client.encode(frames, args.token_dtype)
        token_bytes = len(blob)
        t1 = time.perf_counter()
        png, seed = client.generate(blob, args.seed)
    else:  # pixels and tokens through shared memory
        from eden_serve.images import ImageError, decode_image, encode_png
        try:
            arrays = [decode_image(f, max_pixels=1 << 40, name=p) for f, p in zip(frames, (args.frame0, args.frame1))]
        except ImageError as e:
            print(f"client: {e}", file=sys.stderr)
            return 2
        encoded = client.encode_frames(arrays, args.token_dtype)
        token_bytes = encoded.blob.nbytes
        t1 = time.perf_counter()
        try:
            image, seed = client.generate_pair(encoded, 0, encoded, 1, seed=args.seed)
        finally:
            client.release(encoded)
        png = encode_png(image)
    t2 = time.perf_counter()
    out = Path(args.output)
    try:
        write_new(out, png)
    except OSError as e:
        print(f"client: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (seed {seed}; encoder {1000 * (t1 - t0):.0f} ms, {token_bytes / 1e6:.2f} MB of "
          f"{args.token_dtype} tokens; DiT+decoder {1000 * (t2 - t1):.0f} ms; transport: "
          f"{client.describe_transport()})")
    return 0


def write_new(out: Path, data: bytes) -> None:
    """Write ``out`` whole or not at all, through a temporary file of its own (a fresh random name created with
    O_EXCL, so a link planted under a temporary name is never written through), renamed over ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_demo(args) -> int:
    from .demo import run_demo
    return run_demo(args)


def main(argv=None) -> int:
    prog = "python -m client" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name  # or eden-client
    ap = argparse.ArgumentParser(prog=prog, description="Client of the split EDEN deployment.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pair", help="interpolate the middle frame of two images")
    p.add_argument("frame0")
    p.add_argument("frame1")
    p.add_argument("-o", "--output", required=True, help="output PNG")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: random, printed)")
    p.add_argument("--token-dtype", choices=["float16", "float32", "int8"], default="float16",
                   help="precision of the tokens between the two models (default: %(default)s)")
    add_connection_args(p)
    p.set_defaults(fn=cmd_pair)

    video_cli.register(sub)
    ops_cli.register(sub)

    p = sub.add_parser("demo", help="split, archive, serve on CPU and interpolate a generated sample, then stop")
    p.add_argument("--checkpoint", default=None,
                   help="official EDEN checkpoint (default: a small random-weight one made on the spot)")
    p.add_argument("--workdir", default="build/demo", help="where the demo writes everything")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_demo)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ServeError as e:
        print(f"client: {e}", file=sys.stderr)
        return 1
