"""python -m eden_client COMMAND ...

    pair FRAME0 FRAME1 -o OUT.png [--seed N]     the middle frame of two images
    video / batch                                 videos and folders of them (eden_client/video_cli.py)
    status / scale / models                       operating the deployment (eden_client/ops_cli.py)
    warm                                          a fresh deployment's slow first minute, before users (eden_client/warm.py)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from . import ops_cli, video_cli, warm
from .connection import add_connection_args, connect
from .errors import ServeError


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


def main(argv=None) -> int:
    # python -m eden_client, or the console script's name (eden-client)
    prog = "python -m eden_client" if sys.argv[0].endswith("__main__.py") else Path(sys.argv[0]).name
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
    warm.register(sub)

    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ServeError as e:
        print(f"client: {e}", file=sys.stderr)
        return 1
