"""eden_serve/acceleration.py on a CPU: settings parse, nothing changes where the GPU kernels are not available, and
the opt-in code paths they use (fused temporal attention, weights cast once) give the plain path's numbers."""
import copy

import pytest
import torch

from eden_dev.handler_context import HandlerContext
from eden_serve import acceleration, pipeline, serving
from eden_serve.acceleration import Accelerator, KernelSettings


def pairs_and_noise(tiny_models, fixture_frames):
    encoder, _ = tiny_models
    encoded, diffs = pipeline.encode_frames(encoder, fixture_frames)
    geo = pipeline.Geometry.for_size(90, 120, encoder.cfg)
    pairs = pipeline.PairBatch(encoded.dit[None], encoded.dec[None], encoded.mean[None], encoded.std[None],
                               diffs[0], geo)
    return pairs, pipeline.make_noise(geo, encoder.cfg.latent_dim, 0, "cpu")


def test_settings_parse_and_check():
    k = KernelSettings.parse("compile_mode=default,cuda_graphs=1,attention_backend=cudnn,warmup_sizes=480x854+1080x1920,"
                             "warmup_batches=1+4,max_graphs=4")
    assert (k.compile_mode, k.cuda_graphs, k.attention_backend, k.max_graphs) == ("default", True, "cudnn", 4)
    assert k.warmup_sizes == ("480x854", "1080x1920") and k.warmup_batches == (1, 4) and k.requested
    assert KernelSettings(warmup_sizes=["720x1280"], warmup_batches=[2]).warmup_sizes == ("720x1280",)
    assert KernelSettings(warmup_sizes="480x854,720x1280").warmup_sizes == ("480x854", "720x1280")
    assert not KernelSettings().requested
    for bad in ("compile_mode=fast", "attention_backend=xformers", "warmup_sizes=1080", "nope=1", "max_graphs=0"):
        with pytest.raises(ValueError):
            KernelSettings.parse(bad)
    # handler settings: the same names in the model-config's eden section, off by default
    s = serving.Settings(compile_mode="default", warmup_sizes=["480x854"], cuda_graphs=True)
    assert KernelSettings.from_mapping(s) == KernelSettings(compile_mode="default", warmup_sizes=("480x854",),
                                                            cuda_graphs=True)
    assert KernelSettings.from_mapping(serving.Settings()) == KernelSettings()


def test_build_archives_flag():
    from eden_serve.archives import kernel_settings
    assert kernel_settings("") == {}
    assert kernel_settings("compile_mode=default,warmup_sizes=480x854+1080x1920") == {
        "compile_mode": "default", "warmup_sizes": ["480x854", "1080x1920"]}
    # the default: the measured set on a GPU deployment, nothing on a CPU one; "off" turns them off
    assert kernel_settings("auto", gpus=0) == {} and kernel_settings("off", gpus=1) == {}
    assert kernel_settings("auto", gpus=1) == {"compile_mode": "default", "cuda_graphs": True, "fused_ops": True,
                                               "cast_weights": True, "warmup_sizes": ["480x854", "1080x1920"]}


def test_cpu_accelerator_changes_nothing(tiny_models, fixture_frames):
    """Every setting on, on a CPU: nothing compiled, nothing cast, the same bits as the pipeline's."""
    _, generator = tiny_models
    gen = copy.deepcopy(generator)
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    plain = pipeline.interpolate(generator, pairs, noise)
    accel = Accelerator(gen, KernelSettings(compile_mode="default", cuda_graphs=True, attention_backend="cudnn",
                                            fused_ops=True, cast_weights=True), torch.device("cpu"), torch.float32)
    assert not accel.active
    assert accel.warm_up(["64x64"], [1]).seconds == {}
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    assert not any(b.temp_attn.fused for b in gen.dit_blocks)
    assert torch.equal(accel.interpolate(pairs, noise), plain)
    latents = accel.sample_latents(pairs, noise)
    assert torch.equal(accel.decode_frames(pairs, latents), plain)


def test_compile_needs_a_gpu():
    assert not acceleration.compile_supported(torch.device("cpu"))


def test_cast_weights_same_numbers_as_autocast(tiny_models, fixture_frames):
    """Weights stored in bfloat16 give what autocast's casts give (here on the CPU's autocast)."""
    _, generator = tiny_models
    gen = copy.deepcopy(generator)
    acceleration.cast_matrix_weights(gen, torch.bfloat16)
    assert gen.dit_blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert gen.dit_blocks[0].norm_mlp.weight.dtype == torch.float32
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    a = pipeline.interpolate(generator, pairs, noise, torch.bfloat16)
    b = pipeline.interpolate(gen, pairs, noise, torch.bfloat16)
    assert torch.equal(a, b)


def test_fused_temporal_attention_matches(tiny_models, fixture_frames):
    _, generator = tiny_models
    gen = copy.deepcopy(generator)
    for blk in [*gen.dit_blocks, *gen.decoder_blocks]:
        blk.temp_attn.fused = True
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    assert (pipeline.interpolate(gen, pairs, noise) - pipeline.interpolate(generator, pairs, noise)).abs().max() < 1e-5


def test_profile_ranges_change_nothing(tiny_models, fixture_frames):
    from eden_serve import model
    _, generator = tiny_models
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    plain = pipeline.interpolate(generator, pairs, noise)
    model.PROFILE_RANGES = True
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ranged = pipeline.interpolate(generator, pairs, noise)
    finally:
        model.PROFILE_RANGES = False
    assert torch.equal(ranged, plain)
    names = {e.key for e in prof.key_averages()}
    assert {"dit.block", "decoder.block", "self_attn", "temporal_attn", "sdpa"} <= names


def test_handler_with_kernel_settings_on_cpu(tiny_weights, tiny_models, fixture_frames):
    """The DiT+decoder handler takes the kernel settings from its model-config and, on a CPU, answers as without."""
    from eden_serve import images, tokens
    encoder, _ = tiny_models
    encoded, diffs = pipeline.encode_frames(encoder, fixture_frames)
    geo = pipeline.Geometry.for_size(90, 120, encoder.cfg)
    (blob,) = tokens.to_blobs(encoded, diffs, geo, "float32", encoder.cfg.encoder_fingerprint)
    answers = []
    for eden in ({}, {"compile_mode": "default", "cuda_graphs": True, "cast_weights": True, "fused_ops": True,
                      "attention_backend": "cudnn", "warmup_sizes": ["90x120"], "compile_cache_dir": ""}):
        ctx = HandlerContext(tiny_weights, {**eden, "shm_dir": "", "fast_socket_reads": False},
                             {"X-Eden-Seed": "0", "X-Eden-Format": "raw"}, batch_size=2)
        svc = serving.DitDecService()
        svc.initialize(ctx)
        assert not svc.accel.active
        (answer,) = svc.handle([{"body": blob.to_bytes()}], ctx)
        assert ctx.status == {}
        answers.append(images.decode_image(bytes(answer), 10**6))
    assert (answers[0] == answers[1]).all()
    with pytest.raises(ValueError):
        serving.DitDecService().initialize(HandlerContext(tiny_weights, {"compile_mode": "fast", "shm_dir": ""},
                                                          batch_size=2))


def test_graph_bookkeeping_with_stand_in_graphs(tiny_models, fixture_frames, monkeypatch):
    """The CUDA-graph path's logic on a CPU, with graphs that re-run the pipeline on their static tensors: inputs
    copied in, outputs read from the graph's tensors, one capture per (size, batch), least recently used dropped,
    and a failed capture leaving the plain path."""
    import contextlib

    _, generator = tiny_models
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    accel = Accelerator(generator, KernelSettings(cuda_graphs=True, max_graphs=2), torch.device("cpu"), torch.float32)
    accel.active, accel.graphs_on = True, True
    captures = []

    class StandIn:
        def __init__(self, fn):
            self.replay = fn

    def capture(pairs, batch):
        captures.append((pairs.geometry, batch))
        s = acceleration.PairBatch(pairs.dit.clone(), pairs.dec.clone(), pairs.mean.clone(), pairs.std.clone(),
                                   pairs.difference.clone(), pairs.geometry)
        noise = torch.zeros(batch, pairs.geometry.latent_tokens, generator.cfg.latent_dim)
        latents = pipeline.sample_latents(generator, s, noise)
        frames = pipeline.decode_frames(generator, s, latents)
        return acceleration._Graphs(
            s, noise, latents, frames,
            StandIn(lambda: latents.copy_(pipeline.sample_latents(generator, s, noise))),
            StandIn(lambda: frames.copy_(pipeline.decode_frames(generator, s, latents))))

    monkeypatch.setattr(accel, "_capture", capture)
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    other = acceleration.PairBatch(pairs.dit.flip(1), pairs.dec.flip(1), pairs.mean.flip(1), pairs.std.flip(1),
                                   -pairs.difference, pairs.geometry)
    for p, seed in ((pairs, 0), (other, 1), (pairs, 2)):
        n = pipeline.make_noise(p.geometry, generator.cfg.latent_dim, seed, "cpu")
        assert torch.equal(accel.interpolate(p, n), pipeline.interpolate(generator, p, n))
    assert len(captures) == 1 and accel.graphs[(pairs.geometry, 1)].source is None
    for h, w in ((64, 64), (96, 64), (64, 64)):  # a third size drops the least recently used
        geo = pipeline.Geometry.for_size(h, w, generator.cfg)
        p = acceleration.synthetic_pairs(geo, 1, generator.cfg.hidden_dim, "cpu")
        n = pipeline.make_noise(geo, generator.cfg.latent_dim, 0, "cpu")
        assert torch.equal(accel.interpolate(p, n), pipeline.interpolate(generator, p, n))
    assert len(captures) == 3 and len(accel.graphs) == 2 and (pairs.geometry, 1) not in accel.graphs

    def broken(pairs, batch):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(accel, "_capture", broken)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    assert torch.equal(accel.interpolate(pairs, noise), pipeline.interpolate(generator, pairs, noise))
    assert not accel.graphs_on and "capturing" in accel.graph_error and not accel.graphs


def test_float8_linears_keep_the_weights_and_stay_close(tiny_models, fixture_frames):
    """float8 (GPU-only in the accelerator; torch._scaled_mm also runs on this CPU): the blocks' linears swapped,
    the parameters (names, tensors) unchanged, frames within a float8 distance of float32."""
    _, generator = tiny_models
    gen = copy.deepcopy(generator)
    assert acceleration.float8_blocks(gen) == 6 * (len(gen.dit_blocks) + len(gen.decoder_blocks))
    assert sorted(gen.state_dict()) == sorted(generator.state_dict())
    assert gen.dit_blocks[0].temp_attn.qkv.weight.dtype == torch.float32  # the temporal context reads it
    pairs, noise = pairs_and_noise(tiny_models, fixture_frames)
    ref = pipeline.interpolate(generator, pairs, noise)
    f8 = pipeline.interpolate(gen, pairs, noise, torch.bfloat16)
    assert 10 * torch.log10(1 / ((f8 - ref) ** 2).mean()) > 40
    assert not acceleration.float8_supported(torch.device("cpu"))
