"""A benchmark checkpoint whose middle frame is a blend of the two input frames.

The released weights cannot be fetched here, and random weights make every generated frame noise: the worst case
for the video encoder that writes the output (x264 spends several times longer on a noise frame than on a frame of
a real video), so a benchmark with them measures x264 on noise, not the command on a video. This checkpoint keeps the
random DiT (the same sizes, hence the same GPU work) and sets the encoder's decoder tokens, the decoder and its
output head so that the generated frame is the average of the two inputs at half resolution (each 2x2 block of a
patch one value, de-normalised with the pair's averaged mean and spread, as EDEN does: the mean itself for two
frames of one shot, near it across a cut): frames with a real video's content and motion, as a trained model makes
them. Only for measuring, with float16 or float32 tokens (int8 tokens' per-token scale is set by the constant dims
below and leaves the pixels coarse); the weights make no sense as a model.

How (the released sizes: hidden size D = 768 = 3 x 16 x 16 values of a patch):

* encoder, decoder tokens: dims 0..191 hold the patch's 2x2 block means (x a), dims 192..383 the same negated, dims
  384..575 +c and 576..767 -c. Every token then has mean 0 and a standard deviation set by c alone, so the
  LayerNorm after it is one fixed scale (it removes nothing of the pixels), and the position embedding (|pos| <= 1)
  is small beside a.
* decoder: the query stream starts from a constant (``proj_token``'s bias, signs orthogonal to the tokens' constant
  dims), so in the first block's temporal attention both frames score LAM / 4 and the query itself 0: each frame
  gets half. The values are the pixel dims, the output projection scales them back to A x the block means (x sigma,
  the LayerNorm's scale); every other residual branch is zero.
* output head: LayerNorm (again one fixed scale), then each block mean z through GELU as +z and -z: GELU(z) -
  GELU(-z) = z for any z, so the second layer gives every pixel of the block z exactly (in bfloat16 too).
"""
from __future__ import annotations

import argparse
import os

import torch

from eden_serve.checkpoint import random_state_dict
from eden_serve.config import EdenConfig

A = 100.0  # pixel dims of the tokens (against |pos| <= 1)
C = 1e4  # constant dims (the LayerNorm's scale: C / sqrt(2))
LAM = 80.0  # query size: the frames score LAM / 4, the query itself 0


def blend_state_dict(cfg: EdenConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    D, p, ch = cfg.hidden_dim, cfg.patch_size, cfg.in_dim
    blocks = ch * p * p // 4  # 2x2 block means per patch
    if D != ch * p * p or cfg.out_dim != ch:
        raise ValueError(f"the blend checkpoint needs hidden size = {ch} x {p} x {p}, got {D}")
    sd = random_state_dict(cfg, seed)
    c_, y_, x_ = torch.meshgrid(torch.arange(ch), torch.arange(p), torch.arange(p), indexing="ij")  # [C, p, p] each
    idx = c_ * (p // 2) ** 2 + (y_ // 2) * (p // 2) + x_ // 2  # each pixel's 2x2 block mean (0 .. blocks - 1)
    pix, neg = slice(0, blocks), slice(blocks, 2 * blocks)
    n_const = D - 2 * blocks  # the constant dims
    token_sign = torch.zeros(D)  # the tokens' constant: +C then -C
    token_sign[2 * blocks:2 * blocks + n_const // 2] = 1
    token_sign[2 * blocks + n_const // 2:] = -1
    stream_sign = torch.zeros(D)  # the query stream's: +, -, +, - quarters (orthogonal to token_sign)
    for k, s in enumerate((1, -1, 1, -1)):
        stream_sign[2 * blocks + k * n_const // 4:2 * blocks + (k + 1) * n_const // 4] = s
    sigma = C / 2 ** 0.5  # every token's (and the stream's) standard deviation: the LayerNorms' fixed scale

    # encoder: decoder tokens (the DiT tokens stay random)
    w = torch.zeros(D, ch, p, p)
    for b in range(blocks):
        w[b][idx == b] = A / 4  # the block's mean (x A)
    w[neg] = -w[pix]
    sd["patch_cond_dec.weight"] = w
    sd["patch_cond_dec.bias"] = C * token_sign
    sd["norm_cond_dec.weight"], sd["norm_cond_dec.bias"] = torch.ones(D), torch.zeros(D)

    # decoder: a constant query stream, the first block's temporal attention takes the frames' mean
    sd["proj_token.weight"] = torch.zeros_like(sd["proj_token.weight"])
    sd["proj_token.bias"] = C * stream_sign
    heads, hd = cfg.num_heads, D // cfg.num_heads
    for i in range(cfg.decoder_depth):
        pre = f"decoder_blocks.{i}."
        for name in ("norm_self_attn", "norm_temp_attn", "norm_mlp"):
            sd[pre + name + ".weight"], sd[pre + name + ".bias"] = torch.ones(D), torch.zeros(D)
        sd[pre + "self_attn.proj.weight"] = torch.zeros(D, D)
        sd[pre + "mlp.fc2.weight"] = torch.zeros_like(sd[pre + "mlp.fc2.weight"])
        sd[pre + "mlp.fc2.bias"] = torch.zeros(D)
        qkv = torch.zeros(3 * D, D)
        proj = torch.zeros(D, D)
        if i == 0:
            for h in range(heads):
                qkv[h * hd] = LAM * stream_sign / n_const  # q: LAM x sqrt(2) for the stream, whatever the token
                qkv[D + h * hd] = token_sign / n_const  # k: sqrt(2) for a frame token, 0 for the stream
            qkv[2 * D:2 * D + 2 * blocks] = torch.eye(D)[:2 * blocks]  # v: the pixel dims (A x mean / sigma)
            proj[:2 * blocks, :2 * blocks] = sigma * torch.eye(2 * blocks)  # the stream gets A x the frames' mean
        sd[pre + "temp_attn.qkv.weight"] = qkv
        sd[pre + "temp_attn.proj.weight"] = proj

    # output head: LayerNorm (scale C / sqrt(2)); hidden unit b takes +z_b, unit blocks + b takes -z_b (z_b the block
    # mean, normalised); GELU(z) - GELU(-z) = z exactly, so the second layer gives each pixel its block's z
    sd["unpatchify.0.weight"], sd["unpatchify.0.bias"] = torch.ones(D), torch.zeros(D)
    first = torch.zeros(D, D)
    first[torch.arange(blocks), torch.arange(blocks)] = sigma / A
    first[blocks + torch.arange(blocks), torch.arange(blocks)] = -sigma / A
    second = torch.zeros(D, D)  # output j = (py * p + px) * C + c, as the decoder unpatchifies
    j, b = ((y_ * p + x_) * ch + c_).flatten(), idx.flatten()
    second[j, b] = 1.0
    second[j, blocks + b] = -1.0
    sd["unpatchify.1.weight"], sd["unpatchify.1.bias"] = first, torch.zeros(D)
    sd["unpatchify.3.weight"], sd["unpatchify.3.bias"] = second, torch.zeros(D)
    return sd


def make_blend_checkpoint(path: str | os.PathLike, cfg: EdenConfig | None = None, seed: int = 0) -> None:
    torch.save({"eden": blend_state_dict(cfg or EdenConfig(), seed)}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="where to write the checkpoint (official layout)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random DiT")
    args = ap.parse_args()
    make_blend_checkpoint(args.out, seed=args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
