"""The frame-size limit of a worker (the handlers' ``max_pixels`` setting), when the archive does not set one.

A GPU worker admits 4K (4096x2160, so UHD 3840x2160 too) when its GPU has the memory for a batch of 4K frames;
otherwise, and on CPU, the limit is 2560x1440. Measured: the core makes one 2160x3840 frame in 113 ms with 4.3 GiB
on one H200 (real-size weights, peak of the process), and memory grows about linearly with the pixels (fused
attention), so a batch of B 4K frames needs about B x 4.6 GiB at 4096x2160, plus a reserve for the frame cache and
the allocator. A frame over the limit is refused (400) with a message saying which limit applies and why.

The wire has its own limits: over HTTP, TorchServe's request and response bodies are capped at 256 MiB
(config.properties). A 4K pair of float16 tokens of the released model is ~200 MB (4096x2160: 214 MB), which passes;
in float32 it does not. The encoder's answer is capped the same way (4 frames of 4K would be ~400 MB): it answers
413 and the client sends fewer frames per request. Shared-memory replies carry no body, so no such cap applies.
"""
from __future__ import annotations

DEFAULT_PIXELS = 2560 * 1440  # CPU workers and GPUs without the memory for 4K
UHD_PIXELS = 4096 * 2160  # DCI 4K: UHD 3840x2160 and anything up to 4096 wide at 2160 high
BYTES_PER_PIXEL = 4.3 * 2**30 / (3840 * 2160)  # measured peak per frame in a batch (see above)
RESERVE_BYTES = 2 * 2**30  # frame cache, CUDA context, allocator slack
USABLE = 0.9  # of the GPU's total memory


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def needed_bytes(pixels: int, batch_size: int) -> float:
    """About what a worker needs on its GPU for a batch of ``batch_size`` frames of ``pixels`` each."""
    return max(1, batch_size) * pixels * BYTES_PER_PIXEL + RESERVE_BYTES


def resolve_max_pixels(configured: int, device, batch_size: int = 1, total_memory: int | None = None,
                       workers_on_gpu: int = 1) -> tuple[int, str]:
    """(the limit in pixels, what to say when a frame is over it). ``configured`` > 0 is the archive's own
    setting; 0 means: 4K where the GPU has the memory (``total_memory``: its bytes, read from torch if None) for
    every worker placed on it (``workers_on_gpu``, of both models: each may run a 4K batch at the same time)."""
    how = "set max_pixels in the eden: section of the archive's model-config.yaml"
    if configured > 0:
        return configured, "this worker's max_pixels setting (the eden: section of the archive's model-config.yaml)"
    need = needed_bytes(UHD_PIXELS, batch_size) * max(1, workers_on_gpu)
    if getattr(device, "type", str(device)) != "cuda":
        return DEFAULT_PIXELS, (f"the default limit of a CPU worker: 4K (4096x2160) is admitted by default on a GPU "
                                f"with about {gib(need / USABLE)} at batch size {batch_size}; {how} to admit more")
    if total_memory is None:
        import torch
        total_memory = torch.cuda.get_device_properties(device).total_memory
    if need <= USABLE * total_memory:
        return UHD_PIXELS, (f"the default limit of this worker: 4K (4096x2160) on {device} with "
                            f"{gib(total_memory)}; {how} to admit more")
    return DEFAULT_PIXELS, (f"the default limit of this worker: its GPU {device} has {gib(total_memory)}, and 4K "
                            f"(4096x2160) at batch size {batch_size} for its {max(1, workers_on_gpu)} worker(s) needs "
                            f"about {gib(need / USABLE)}; {how}, or build the archives with a smaller --batch-size or "
                            f"fewer --workers-per-gpu")


def explain(message: str, note: str) -> str:
    """A refusal message, with the limit's explanation when it is about the pixel limit."""
    return f"{message} ({note})" if note and "over the limit of" in message and "pixels" in message else message


def parse_size(text: str) -> tuple[int, int]:
    """"1080x1920" -> (1080, 1920): a frame size as HEIGHTxWIDTH (the kernels' warmup_sizes, the client's warm)."""
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"a frame size is HEIGHTxWIDTH, e.g. 1080x1920; got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"frame size {text!r} is empty")
    return h, w
