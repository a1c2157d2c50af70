"""GPU kernels for the DiT+decoder: torch.compile of the blocks, the SDPA backend, CUDA graphs, weights cast once,
and a warm-up at worker start so that a user's first frame pays none of it. Off in ``KernelSettings()``; the
archives of a GPU deployment turn on the measured set (``eden_serve/archives.py`` GPU_KERNELS, ``--kernels auto``).

    kernels = KernelSettings(compile_mode="default", cuda_graphs=True, attention_backend="cudnn")
    accel = Accelerator(generator, kernels, device, torch.bfloat16)
    accel.warm_up([(1080, 1920)], [1, 4])              # at worker start
    latents = accel.sample_latents(pairs, noise)       # = pipeline.sample_latents(generator, pairs, noise, dtype)
    frames = accel.decode_frames(pairs, latents)       # = pipeline.decode_frames(generator, pairs, latents, dtype)

What each setting does:
- ``compile_mode`` (off | default | max-autotune-no-cudagraphs): ``torch.compile`` of each DiT and
  decoder block ("regional" compilation: the 12 DiT blocks share one compiled graph, the 4 decoder blocks another),
  with dynamic batch and token dimensions, so any frame size reuses the same code: a worker compiles twice per
  block kind (batch 1 is specialised, batch >= 2 is not), whatever sizes its videos have. The compiler fuses the
  LayerNorms, the adaLN modulation, the gates, GELU, the residual adds and the casts around the matrix products.
  Results are kept in ``compile_cache_dir`` (TORCHINDUCTOR_CACHE_DIR), so a restarted worker loads instead of
  compiling. (No "reduce-overhead": its CUDA graphs would be per block, copying each block's inputs in; the
  ``cuda_graphs`` setting captures whole calls instead.)
- ``fused_ops``: with compile, the temporal attention as products and sums without a concatenation (one kernel).
- ``attention_backend`` (auto | cudnn | flash | efficient | math): the SDPA backend tried first (the others stay as
  fallbacks for shapes it does not support); auto is PyTorch's own choice.
- ``cuda_graphs``: the Euler steps and the decoder each captured as a CUDA graph per (frame size, batch), replayed
  with one launch; captured on first use of a (size, batch) (at worker start for the warm-up sizes), at most
  ``max_graphs`` kept (least recently used dropped). Results returned in graph mode live in the graph's memory until
  the next call with the same size and batch: copy them out (``pipeline.to_uint8`` does) before that.
- ``cast_weights``: the matrices' weights stored once in the compute dtype (bfloat16) instead of being cast by
  autocast at every use; gives the same numbers (autocast casts the same way).
- ``float8`` (experimental, changes the numbers: measure its quality): the blocks' linear layers multiply in float8
  (e4m3, ``torch._scaled_mm``) with a scale per weight row and per activation row, out in bfloat16; the frames'
  keys/values stay bfloat16. Needs a GPU with float8 (compute capability 8.9+); meant with ``compile_mode`` (the
  compiler fuses the activations' scaling into the kernels before).

Nothing here runs on a CPU: there, or with every setting off, ``Accelerator`` calls the pipeline functions as they
are and changes nothing. ``compile_mode`` is dropped (with a warning) where torch.compile cannot generate GPU code
(no Triton).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import model, pipeline
from .limits import parse_size
from .model import EdenGenerator
from .pipeline import Geometry, PairBatch

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


@dataclass(frozen=True)
class KernelSettings:
    compile_mode: str = "off"
    attention_backend: str = "auto"
    cuda_graphs: bool = False
    fused_ops: bool = False
    cast_weights: bool = False
    float8: bool = False
    warmup_sizes: tuple[str, ...] = ()  # "HxW" frame sizes warmed at worker start
    warmup_batches: tuple[int, ...] = ()  # batch sizes warmed per size (default: 1 .. the model's batchSize)
    compile_cache_dir: str = ""  # persistent compile cache ("" : PyTorch's default, under /tmp)
    max_graphs: int = 8

    def __post_init__(self):
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
        sizes, batches = self.warmup_sizes, self.warmup_batches
        if isinstance(sizes, str):  # "480x854,1080x1920" as well as a list
            sizes = sizes.replace("+", ",").split(",")
        if isinstance(batches, (str, int)):
            batches = str(batches).replace("+", ",").split(",")
        sizes = tuple(s.strip() for s in sizes if str(s).strip())
        for size in sizes:
            parse_size(size)
        object.__setattr__(self, "warmup_sizes", sizes)
        object.__setattr__(self, "warmup_batches", tuple(int(b) for b in batches if str(b).strip()))
        if any(b < 1 for b in self.warmup_batches) or self.max_graphs < 1:
            raise ValueError("warmup_batches and max_graphs must be >= 1")

    @property
    def requested(self) -> bool:
        return (self.compile_mode != "off" or self.attention_backend != "auto" or self.cuda_graphs
                or self.cast_weights or self.float8)

    @classmethod
    def from_mapping(cls, values) -> "KernelSettings":
        """The settings of this class's field names in ``values`` (a dict or a dataclass); the others ignored."""
        get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
        return cls(**{f.name: get(f.name) for f in fields(cls) if get(f.name) is not None})

    @classmethod
    def parse(cls, text: str) -> "KernelSettings":
        """"compile_mode=default,cuda_graphs=1,attention_backend=cudnn,warmup_sizes=480x854+1080x1920" (CLI form)."""
        types = {f.name: f.type for f in fields(cls)}
        out = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            name, _, value = item.partition("=")
            if name not in types:
                raise ValueError(f"unknown kernel setting {name!r}: one of {', '.join(types)}")
            kind = str(types[name])
            if "bool" in kind:
                out[name] = value.lower() in ("1", "true", "yes", "on")
            elif "tuple" in kind:
                out[name] = tuple(v for v in value.split("+") if v)
            elif kind == "int":
                out[name] = int(value)
            else:
                out[name] = value
        return cls(**out)

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def compile_supported(device: torch.device) -> bool:
    """torch.compile can generate GPU kernels here (a CUDA device and Triton)."""
    if device.type != "cuda":
        return False
    try:
        from torch.utils._triton import has_triton
        return bool(has_triton())
    except Exception:  # noqa: BLE001 - an odd build: no compile
        return False


def use_compile_cache(path: str) -> None:
    """Point the inductor (and Triton) caches at ``path``, before anything is compiled."""
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(path, "triton"))
    try:
        import torch._inductor.config as inductor_config
        inductor_config.fx_graph_cache = True
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = True
    except Exception:  # noqa: BLE001 - caches are an optimisation
        log.warning("could not turn the compile caches on", exc_info=True)


def sdpa_backends(name: str) -> list | None:
    """The SDPA backends in order of preference for a setting; None for PyTorch's own choice."""
    if name == "auto":
        return None
    from torch.nn.attention import SDPBackend
    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [order[name]] + [b for k, b in order.items() if k != name]


def attention_context(backends: list | None):
    """SDPA restricted to ``backends``, the first preferred (older PyTorch without priorities: the first alone)."""
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel
    try:
        return sdpa_kernel(backends, set_priority=True)
    except TypeError:
        return sdpa_kernel(backends[:1])


def cast_matrix_weights(generator: nn.Module, dtype: torch.dtype) -> None:
    """Linear weights and biases in ``dtype`` (what autocast would cast them to at each use); norms stay float32."""
    for m in generator.modules():
        if isinstance(m, nn.Linear):
            m.to(dtype)


FLOAT8_MAX = 448.0  # largest float8 e4m3 value


class Float8Linear(nn.Module):
    """A Linear multiplying in float8: weights quantised once (a scale per output row), activations at each call (a
    scale per row, from its largest magnitude); out in bfloat16. ``weight`` and ``bias`` stay the original
    parameters (other code reads them: the temporal context takes the keys' and values' rows of ``qkv``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight.detach().float()  # [N, K]
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX  # [N, 1]
        self.register_buffer("weight8", (w / scale).to(torch.float8_e4m3fn), persistent=False)  # [N, K]
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, N = x.shape[-1], self.weight8.shape[0]
        a = x.reshape(-1, K).float()  # [M, K]
        M = a.shape[0]
        a = F.pad(a, (0, 0, 0, -M % 16))  # rows to a multiple of 16
        scale = a.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FLOAT8_MAX  # [M', 1]
        a8 = (a / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(a8, self.weight8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=torch.bfloat16)[:M]  # [M, N]
        if self.bias is not None:
            out = out + self.bias.to(torch.bfloat16)
        return out.reshape(*x.shape[:-1], N)


def float8_blocks(generator: EdenGenerator) -> int:
    """The blocks' linear layers as Float8Linear (the heads, embeddings and temporal contexts stay); -> how many."""
    count = 0
    for blk in [*generator.dit_blocks, *generator.decoder_blocks]:
        for parent in (blk.self_attn, blk.temp_attn, blk.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Float8Linear(child))
                    count += 1
    return count


def float8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass
class _Graphs:
    """Static inputs and outputs of the two captured graphs of one (geometry, batch)."""
    pairs: PairBatch
    noise: torch.Tensor
    latents: torch.Tensor
    frames: torch.Tensor
    sample: torch.cuda.CUDAGraph
    decode: torch.cuda.CUDAGraph
    source: object = None  # the PairBatch sample_latents copied in, until decode_frames has used it
    # cached constants the graphs read (positions, upsample matrices): a replay holds raw pointers to them, so they
    # must outlive the caches' eviction
    constants: tuple = ()


@dataclass
class WarmUp:
    """What the warm-up did: seconds per (size, batch), and in all."""
    seconds: dict = field(default_factory=dict)
    total_s: float = 0.0


class Accelerator:
    """The DiT+decoder's two pipeline calls, with the kernels of ``settings`` where this device has them."""

    def __init__(self, generator: EdenGenerator, settings: KernelSettings, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16):
        self.generator, self.device, self.dtype = generator, torch.device(device), dtype
        cuda = self.device.type == "cuda"
        self.compile_mode = settings.compile_mode if cuda else "off"
        if self.compile_mode != "off" and not compile_supported(self.device):
            log.warning("compile_mode=%s asked for, but torch.compile cannot generate kernels for %s here (no "
                        "Triton): running without it", settings.compile_mode, self.device)
            self.compile_mode = "off"
        self.backends = sdpa_backends(settings.attention_backend) if cuda else None
        self.graphs_on = settings.cuda_graphs and cuda
        self.settings = settings
        self.graphs: OrderedDict[tuple, _Graphs] = OrderedDict()
        self.graph_error: str | None = None
        self.warmed = 0  # graphs captured by warm_up: the cache keeps at least that many
        self.float8 = False
        self.active = cuda and settings.requested
        if not self.active:
            return
        if settings.cast_weights and dtype != torch.float32:
            cast_matrix_weights(generator, dtype)
        self.float8 = settings.float8 and float8_supported(self.device)
        if settings.float8 and not self.float8:
            log.warning("float8 asked for, but %s has no float8 matrix units: running without it", self.device)
        if self.float8:
            float8_blocks(generator)
        if self.compile_mode != "off":
            use_compile_cache(settings.compile_cache_dir)
            self._compile()
        log.info("kernels on %s: compile=%s fused=%s attention=%s cuda_graphs=%s cast_weights=%s float8=%s",
                 self.device, self.compile_mode, settings.fused_ops and self.compile_mode != "off",
                 settings.attention_backend, self.graphs_on, settings.cast_weights, self.float8)

    def _compile(self) -> None:
        import torch._dynamo.config as dynamo_config
        for name in ("recompile_limit", "cache_size_limit"):  # 2 graphs per block kind; headroom for odd shapes
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 32))
        blocks = [*self.generator.dit_blocks, *self.generator.decoder_blocks]
        for blk in blocks:
            blk.temp_attn.fused = self.settings.fused_ops
            blk.compile(mode=None if self.compile_mode == "default" else self.compile_mode, dynamic=True)

    # ------------------------------------------------------------------ the two calls
    def _sample(self, pairs: PairBatch, noise: torch.Tensor) -> torch.Tensor:
        with attention_context(self.backends):
            return pipeline.sample_latents(self.generator, pairs, noise, self.dtype)

    def _decode(self, pairs: PairBatch, latents: torch.Tensor) -> torch.Tensor:
        with attention_context(self.backends):
            return pipeline.decode_frames(self.generator, pairs, latents, self.dtype)

    def sample_latents(self, pairs: PairBatch, noise: torch.Tensor) -> torch.Tensor:
        """= pipeline.sample_latents(generator, pairs, noise, dtype). In graph mode the result is the graph's."""
        g = self._graphs_for(pairs, noise) if self.graphs_on else None
        if g is None:  # (inactive: no backends chosen, so _sample is the pipeline's call)
            return self._sample(pairs, noise)
        with torch.inference_mode(), torch.cuda.device(self.device):
            _copy_pairs(g.pairs, pairs, ("dit", "dec", "mean", "std", "difference"))
            g.noise.copy_(noise)
            g.source = pairs
            g.sample.replay()
        return g.latents

    def decode_frames(self, pairs: PairBatch, latents: torch.Tensor) -> torch.Tensor:
        """= pipeline.decode_frames(generator, pairs, latents, dtype). In graph mode the result is the graph's."""
        g = self._graphs_for(pairs, latents) if self.graphs_on else None
        if g is None:
            return self._decode(pairs, latents)
        with torch.inference_mode(), torch.cuda.device(self.device):
            if g.source is not pairs:  # (sample_latents copied this batch in already)
                _copy_pairs(g.pairs, pairs, ("dec", "mean", "std"))
                g.source = pairs
            if latents is not g.latents:
                g.latents.copy_(latents)
            g.decode.replay()
            g.source = None  # (not holding the caller's batch)
        return g.frames

    def interpolate(self, pairs: PairBatch, noise: torch.Tensor) -> torch.Tensor:
        return self.decode_frames(pairs, self.sample_latents(pairs, noise))

    # ------------------------------------------------------------------ CUDA graphs
    def _graphs_for(self, pairs: PairBatch, like: torch.Tensor) -> _Graphs | None:
        """The graphs of this batch's (geometry, batch size), captured now if new; None if capturing failed (then
        this worker goes on without graphs, and says why once)."""
        key = (pairs.geometry, like.shape[0])
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return self.graphs[key]
        while len(self.graphs) >= max(self.settings.max_graphs, self.warmed):  # (never drop what was warmed)
            self.graphs.popitem(last=False)
        try:
            g = self.graphs[key] = self._capture(pairs, like.shape[0])
        except Exception as e:  # noqa: BLE001 - the same work runs without graphs
            self.graphs_on, self.graph_error = False, f"{type(e).__name__}: {e}"
            self.graphs.clear()
            log.exception("capturing CUDA graphs failed: going on without them")
            torch.cuda.synchronize(self.device)
            return None
        return g

    @torch.inference_mode()
    def _capture(self, pairs: PairBatch, batch: int) -> _Graphs:
        with torch.cuda.device(self.device):
            return self._capture_here(pairs, batch)

    def _capture_here(self, pairs: PairBatch, batch: int) -> _Graphs:
        t = time.perf_counter()
        geo = pairs.geometry
        static = PairBatch(dit=pairs.dit.clone(memory_format=torch.contiguous_format),
                           dec=pairs.dec.clone(memory_format=torch.contiguous_format), mean=pairs.mean.clone(),
                           std=pairs.std.clone(), difference=pairs.difference.clone(), geometry=geo)
        noise = torch.randn(batch, geo.latent_tokens, self.generator.cfg.latent_dim, device=self.device)
        side = torch.cuda.Stream(self.device)  # warm-up off the capture stream: compiles, lazy inits, positions
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._decode(static, self._sample(static, noise))
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        sample, decode = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(sample):
            latents = self._sample(static, noise)
        with torch.cuda.graph(decode):
            frames = self._decode(static, latents)
        log.info("captured CUDA graphs for %dx%d, batch %d, in %.2f s", geo.height, geo.width, batch,
                 time.perf_counter() - t)
        return _Graphs(static, noise, latents, frames, sample, decode, constants=self._constants(geo))

    def _constants(self, geo) -> tuple:
        """The cached device tensors a (size) graph reads: they are the cache's values, so holding them here keeps
        their memory from being reused when the caches evict them."""
        gh, gw = geo.grid
        matrices = tuple(model._bicubic2x_matrix(n // 2, self.device, torch.float32) for n in (gh, gw))
        return matrices + tuple(self.generator._pos(geo.grid, stride, self.device) for stride in (1, 2))

    # ------------------------------------------------------------------ warm-up
    @torch.inference_mode()
    def warm_up(self, sizes: Iterable, batches: Iterable[int]) -> WarmUp:
        """Run every (size, batch) once (compiling, and capturing graphs): a user's first request at these sizes
        pays nothing. Sizes as (H, W) or "HxW". Nothing to do when inactive."""
        report = WarmUp()
        if not self.active:
            return report
        sizes, batches = list(sizes), list(batches)
        self.warmed = len(sizes) * len(batches)
        start = time.perf_counter()
        cfg = self.generator.cfg
        for size in sizes:
            h, w = parse_size(size) if isinstance(size, str) else size
            geo = Geometry.for_size(h, w, cfg)
            for b in batches:
                t = time.perf_counter()
                pairs = synthetic_pairs(geo, b, cfg.hidden_dim, self.device)
                noise = torch.randn(b, geo.latent_tokens, cfg.latent_dim, device=self.device)
                pipeline.to_uint8(self.interpolate(pairs, noise))
                report.seconds[f"{h}x{w}/b{b}"] = round(time.perf_counter() - t, 3)
                log.info("warmed %dx%d batch %d in %.1f s", h, w, b, report.seconds[f"{h}x{w}/b{b}"])
        report.total_s = round(time.perf_counter() - start, 3)
        return report


def synthetic_pairs(geo: Geometry, batch: int, hidden_dim: int, device) -> PairBatch:
    """B pairs of token-like values (unit variance, as the encoder's LayerNorms give) for warming up."""
    gen = torch.Generator(device=device).manual_seed(0)
    N = geo.grid[0] * geo.grid[1]
    dit = torch.randn(batch, 2, N, hidden_dim, device=device, generator=gen)
    dec = torch.randn(batch, 2, N, hidden_dim, device=device, generator=gen)
    ones = torch.ones(batch, 2, device=device)
    return PairBatch(dit, dec, 0.5 * ones, 0.25 * ones, torch.zeros(batch, device=device), geo)


def _copy_pairs(dst: PairBatch, src: PairBatch, names: tuple[str, ...]) -> None:
    for name in names:
        d, s = getattr(dst, name), getattr(src, name)
        if d is not s:
            d.copy_(s)
