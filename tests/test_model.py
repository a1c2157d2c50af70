"""The core against the official implementation's output (tests/fixtures/eden_tiny, float32, CPU, seed 0)."""
import json

import numpy as np
import pytest
import torch
from conftest import FIXTURE, read_rgb

from eden_serve import pipeline, tokens, wire
from eden_serve.config import EdenConfig
from eden_serve.model import EdenEncoder, EdenGenerator

TOL = 1e-4


def run_pair(encoder, generator, frames, seed=0, dtype="float32"):
    """frames [2, C, H, W] -> middle frame, going through the wire format like the deployment."""
    encoded, diffs = pipeline.encode_frames(encoder, frames)
    geo = pipeline.Geometry.for_size(*frames.shape[-2:], encoder.cfg)
    (blob,) = tokens.to_blobs(encoded, diffs, geo, dtype, encoder.cfg.encoder_fingerprint)
    blob = wire.from_bytes(blob.to_bytes())
    geo = tokens.check_fits(blob, generator.cfg)
    pairs = tokens.pair_batch([blob], [tokens.tokens_tensor(blob, torch.device("cpu"))], geo)
    noise = pipeline.make_noise(geo, generator.cfg.latent_dim, seed, "cpu")
    return pipeline.interpolate(generator, pairs, noise)


def psnr(a, b):
    return 10 * torch.log10(1.0 / torch.mean((a - b) ** 2)).item()


def test_config_read_from_shapes(tiny_weights):
    meta = json.loads((FIXTURE / "meta.json").read_text())
    cfg = EdenConfig.from_json((tiny_weights / "eden_config.json").read_text())
    args = meta["model_args"]
    for k in ("in_dim", "out_dim", "patch_size", "latent_dim", "hidden_dim", "num_heads", "mlp_ratio", "dit_depth",
              "decoder_depth", "qkv_bias"):
        assert getattr(cfg, k) == args[k], k
    assert (cfg.cos_sim_mean, cfg.cos_sim_std) == (meta["cos_sim_mean"], meta["cos_sim_std"])
    assert (cfg.latent_scale, cfg.latent_shift) == (meta["vae_scaler"], meta["vae_shift"])
    assert list(cfg.time_grid) == meta["ode_time_grid"]
    assert len(cfg.encoder_fingerprint) == 16


def test_encoder_tokens_match_official(tiny_models, fixture_frames, expected):
    encoder, _ = tiny_models
    encoded, (diff,) = pipeline.encode_frames(encoder, fixture_frames)
    assert (encoded.dit - expected["cond_dit"]).abs().max() <= TOL
    assert (encoded.dec - expected["cond_dec"]).abs().max() <= TOL
    assert (encoded.mean.mean() - expected["stats_mean"]).abs().max() <= TOL
    assert (encoded.std.mean() - expected["stats_std"]).abs().max() <= TOL
    assert (diff - expected["difference"].flatten()).abs().max() <= TOL


def test_a_lead_frame_gives_its_difference_and_no_tokens(tiny_models, fixture_frames):
    """A group whose first frame is a lead (sent before a chunk for the difference of the pair it makes with the
    chunk's first frame): the tokens of the other frames only, as if they came alone, and the lead's difference
    first in the group's differences; the blob has it as ``lead_difference``. Groups with and without leads batch."""
    encoder, _ = tiny_models
    a, b = fixture_frames[:1], fixture_frames[1:]
    alone, (want,) = pipeline.encode_frames(encoder, fixture_frames)
    encoded, diffs = pipeline.encode_frames(encoder, torch.cat([a, b, a, b]), [2, 2], [True, False])
    assert encoded.dit.shape[0] == 3 and torch.allclose(encoded.dit[0], alone.dit[1], atol=1e-6)
    assert torch.allclose(encoded.dit[1:], alone.dit, atol=1e-6)
    assert torch.equal(diffs[0], want) and torch.equal(diffs[1], want)
    geo = pipeline.Geometry.for_size(90, 120, encoder.cfg)
    led, plain = tokens.to_blobs(encoded, diffs, geo, "float32", "", [True, False])
    assert led.num_frames == 1 and led.differences == [] and led.lead_difference == float(want[0])
    assert plain.num_frames == 2 and plain.differences == want.tolist() and plain.lead_difference is None


def test_noise_recipe(expected):
    meta = json.loads((FIXTURE / "meta.json").read_text())
    geo = pipeline.Geometry.for_size(meta["height"], meta["width"], EdenConfig())
    assert list(geo.padded_size) == meta["padded"]
    noise = pipeline.make_noise(geo, 16, meta["noise_seed"], "cpu")
    assert torch.equal(noise, expected["noise"])


def test_latents_and_frame_match_official(tiny_models, fixture_frames, expected):
    encoder, generator = tiny_models
    encoded, diffs = pipeline.encode_frames(encoder, fixture_frames)
    geo = pipeline.Geometry.for_size(90, 120, encoder.cfg)
    pairs = pipeline.PairBatch(encoded.dit[None], encoded.dec[None], encoded.mean[None], encoded.std[None],
                               diffs[0], geo)
    latents = pipeline.sample_latents(generator, pairs, expected["noise"])
    assert (latents - expected["latents"]).abs().max() <= TOL
    frame = pipeline.decode_frames(generator, pairs, latents)
    assert frame.shape == expected["frame"].shape
    assert (frame - expected["frame"]).abs().max() <= TOL
    # the official frame rounded to 8 bits, as the server writes it
    png = read_rgb(FIXTURE / "expected.png").astype(int)
    assert np.abs(pipeline.to_uint8(frame)[0].numpy().astype(int) - png).max() <= 1


def test_split_wire_float32_equals_whole_model(tiny_models, fixture_frames, expected):
    encoder, generator = tiny_models
    frame = run_pair(encoder, generator, fixture_frames, dtype="float32")
    assert (frame - expected["frame"]).abs().max() <= TOL


def test_float16_wire_keeps_50db(tiny_models, fixture_frames):
    encoder, generator = tiny_models
    f32 = run_pair(encoder, generator, fixture_frames, dtype="float32")
    f16 = run_pair(encoder, generator, fixture_frames, dtype="float16")
    assert psnr(f16, f32) >= 50


def test_stateless_batches_and_sizes(tiny_models, fixture_frames):
    """One model, interleaved sizes and a batch of two pairs: same answers as one pair at a time."""
    encoder, generator = tiny_models
    small = run_pair(encoder, generator, fixture_frames)
    big_frames = torch.nn.functional.interpolate(fixture_frames, size=(70, 150), mode="bilinear")
    big = run_pair(encoder, generator, big_frames)
    assert big.shape[-2:] == (70, 150)
    assert torch.equal(run_pair(encoder, generator, fixture_frames), small)
    encoded, diffs = pipeline.encode_frames(encoder, torch.cat([fixture_frames, fixture_frames]), [2, 2])
    geo = pipeline.Geometry.for_size(90, 120, encoder.cfg)
    pairs = pipeline.PairBatch(encoded.dit.view(2, 2, *encoded.dit.shape[1:]),
                               encoded.dec.view(2, 2, *encoded.dec.shape[1:]), encoded.mean.view(2, 2),
                               encoded.std.view(2, 2), torch.cat(diffs), geo)
    noise = pipeline.make_noise(geo, 16, 0, "cpu").repeat(2, 1, 1)
    batched = pipeline.interpolate(generator, pairs, noise)
    assert (batched - small).abs().max() <= 1e-5


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 96), (100, 31)])
def test_geometry_padding(size):
    geo = pipeline.Geometry.for_size(*size, EdenConfig())
    ph, pw = geo.padded_size
    assert ph % 32 == 0 and pw % 32 == 0 and ph - size[0] < 32 and pw - size[1] < 32
    x = torch.rand(1, 3, *size)
    assert torch.equal(geo.unpad(geo.pad(x)), x)


def test_real_size_architecture_shapes():
    """The released sizes build, and their parameter names/shapes read back to the same config."""
    cfg = EdenConfig()
    with torch.device("meta"):
        sd = {**EdenEncoder(cfg).state_dict(), **EdenGenerator(cfg).state_dict()}
    assert EdenConfig.from_state_dict(sd) == cfg
    assert sd["dit_blocks.11.temp_attn.qkv.weight"].shape == (2304, 768)
    assert sd["unpatchify.3.weight"].shape == (768, 768)
    assert sum(v.numel() for v in sd.values()) > 100_000_000


def test_uint8_frame_difference_matches(fixture_frames, expected):
    frames = (fixture_frames.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    got = pipeline.frame_difference_uint8(frames[0], frames[1], EdenConfig())
    assert abs(got - expected["difference"].item()) <= 1e-5
    black = np.zeros((40, 50, 3), np.uint8)
    x = torch.from_numpy(np.stack([black, frames[0][:40, :50]])).permute(0, 3, 1, 2).float() / 255
    want = pipeline.frame_difference(x[:1], x[1:], EdenConfig()).item()
    assert abs(pipeline.frame_difference_uint8(black, frames[0][:40, :50], EdenConfig()) - want) <= 1e-5


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 3, 1, 1), (1, 16, 15, 27)])
def test_bicubic_upsample_as_matrix_products(shape):
    """The decoder's x2 bicubic upsample (two small matrix products) is F.interpolate's, borders included."""
    from eden_serve.model import upsample2x_bicubic
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(x, scale_factor=2.0, mode="bicubic", align_corners=False)
    assert torch.allclose(upsample2x_bicubic(x), want, atol=2e-6)


def test_to_uint8_matches_the_reference_rounding_byte_for_byte():
    """pipeline.to_uint8 writes the channels-last uint8 frame in one cast: the same bytes as the plain chain
    (torchvision's save_image rounding), for slices of a padded frame too, and into a given buffer."""
    g = torch.Generator().manual_seed(0)
    padded = torch.rand(2, 3, 40, 70, generator=g)
    padded[0, 0, 0, :10] = torch.arange(10) / 255 + 0.5 / 255  # exact halves
    padded[1, 1, 3, :4] = torch.tensor([0.0, 1.0, 1e-9, 1 - 1e-7])
    frames = padded[..., 2:38, 3:67]  # a view, as Geometry.unpad makes
    want = frames.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    assert torch.equal(pipeline.to_uint8(frames), want)
    out = torch.empty(2, 36, 64, 3, dtype=torch.uint8)
    assert pipeline.to_uint8(frames, out=out) is out and torch.equal(out, want)


@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_embedding_as_a_matrix_product_equals_the_convolution(channels_last):
    """The encoder's patch embeddings are a matrix product over patches (patchify + linear), the same numbers as
    the checkpoint's Conv2d, whatever the frames' memory layout (the encoder service uploads channels-last)."""
    from eden_serve.model import patch_embed, patchify
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=16, stride=16)
    frames = torch.rand(2, 3, 64, 96)
    if channels_last:
        frames = frames.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    want = conv(frames).flatten(2).transpose(1, 2)  # [B, N, D]
    got = patch_embed(patchify(frames, 16), conv)
    assert got.shape == want.shape == (2, 4 * 6, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(48, 64), (37, 53), (270, 480)])
def test_frame_difference_is_one_number_on_either_side(size):
    """The encoder's difference (torch) and the client's (NumPy, for pairs across encoder requests) are the same
    float32 number: the output must not depend on how the client grouped frames into requests."""
    rng = np.random.default_rng(sum(size))
    for smooth in (False, True):
        f = rng.integers(0, 256, (2, *size, 3), dtype=np.uint8)
        if smooth:  # nearly equal frames with black pixels: similarities near 1, zero norms
            f[1] = np.clip(f[0].astype(int) + rng.integers(-2, 3, f[0].shape), 0, 255)
            f[:, :5] = 0
        x = torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255
        device = pipeline.frame_difference(x[:1], x[1:], EdenConfig()).item()
        assert pipeline.frame_difference_uint8(f[0], f[1], EdenConfig()) == device
