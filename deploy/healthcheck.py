"""Container health check: TorchServe answers /ping as Healthy and (with --model) the model has READY workers.

    python deploy/healthcheck.py [--model eden_ditdec] [--key-file key_file.json]

Exit code 0 healthy, 1 not. Uses the pod's own key_file.json (renewing expired keys through the loopback
management API), so it works with token authorization on. Used by the images' HEALTHCHECK and the Kubernetes probes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eden_client.errors import ServeError  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_client.ops import ManagementClient  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inference-url", default="http://127.0.0.1:8080")
    ap.add_argument("--management-url", default="http://127.0.0.1:8081")
    ap.add_argument("--key-file", default="key_file.json")
    ap.add_argument("--model", default=None, help="also require this model to have all its workers READY")
    args = ap.parse_args(argv)
    keys = KeySource(key_file=Path(args.key_file), management_url=args.management_url)
    try:
        key = keys.read("inference")
        if key is None:
            print(f"unhealthy: no {args.key_file} yet (TorchServe still starting)")
            return 1
        r = requests.get(f"{args.inference_url}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=5)
        if r.status_code != 200 or r.json().get("status") != "Healthy":
            print(f"unhealthy: /ping answered {r.status_code} {r.text[:200]}")
            return 1
        if args.model:
            desc = ManagementClient(args.management_url, keys, timeout=5).describe(args.model)
            workers = [w for d in desc for w in d.get("workers", [])]
            if not workers or any(w.get("status") != "READY" for w in workers):
                print(f"unhealthy: {args.model} workers " + (", ".join(w["status"] for w in workers) or "none"))
                return 1
    except (requests.RequestException, ServeError, ValueError) as e:
        print(f"unhealthy: {e}")
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
