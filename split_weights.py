#!/usr/bin/env python3
"""Split an official EDEN checkpoint into the encoder and DiT+decoder weights the two archives carry.

    python split_weights.py eden.pt --out-dir weights/ [--num-heads 12]

Writes encoder.safetensors, ditdec.safetensors (each only its own tensors) and eden_config.json (sizes read from
the tensor shapes, the release's constants, the encoder's fingerprint). The checkpoint is loaded with
weights_only=True; a file that is not an EDEN checkpoint is refused with a message naming what is wrong.
"""
import argparse
import sys

from eden_serve.checkpoint import split_checkpoint
from eden_serve.config import CheckpointError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="official checkpoint ({'eden': state_dict}), e.g. eden.pt")
    ap.add_argument("--out-dir", required=True, help="folder for the split weights and config")
    ap.add_argument("--num-heads", type=int, default=None,
                    help="attention heads (not readable from shapes; default hidden size / 64, 12 for the release)")
    args = ap.parse_args(argv)
    try:
        cfg = split_checkpoint(args.checkpoint, args.out_dir, num_heads=args.num_heads)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"split_weights: {e}", file=sys.stderr)
        return 2
    print(f"split {args.checkpoint} -> {args.out_dir}: hidden {cfg.hidden_dim}, {cfg.num_heads} heads, "
          f"{cfg.dit_depth} DiT blocks, {cfg.decoder_depth} decoder blocks, patch {cfg.patch_size}, "
          f"latent {cfg.latent_dim}, encoder {cfg.encoder_fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
