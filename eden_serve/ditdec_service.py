"""The DiT+decoder's TorchServe service: a pair's tokens in (a blob, or shared-memory references to token segments
and to tokens handed off on the encoder's GPU), the middle frame out (PNG or raw)."""
from __future__ import annotations

import contextlib
import logging
import secrets

import torch

from . import acceleration, checkpoint, handoff, images, pipeline, protocol, shm, tokens, wire
from .frame_cache import DeviceFrameCache
from .service import (METRIC_TOKEN_BYTES_IN, BatchService, RequestError, _as_bytes, check_binary, parse_seed,
                      request_header)

log = logging.getLogger(__name__)


class DitDecService(BatchService):
    """A pair's token blob -> the middle frame.

    Body: the blob, or a shared-memory reference to one (``{"segment": NAME}``) or to two frames of blobs
    (``{"pair": [...], "difference": d}``, see eden_serve/shm.py). Headers: X-Eden-Seed (the noise seed; without it a
    fresh one is drawn, and the answer's X-Eden-Seed says which), X-Eden-Format: png (default) or raw.
    """

    def load(self):
        self.generator = checkpoint.load_generator(self.model_dir, self.device)
        self.frames = DeviceFrameCache(self.settings.frame_cache)  # eden_serve/frame_cache.py
        self.accel = self.accelerate()

    def accelerate(self) -> acceleration.Accelerator:
        """The GPU kernels of the settings, compiled and warmed for the configured sizes now, before any request;
        if that fails, the worker serves without them (and says why in its log)."""
        kernels = acceleration.KernelSettings.from_mapping(self.settings)  # (a bad value stops the worker)
        try:
            accel = acceleration.Accelerator(self.generator, kernels, self.device, self.compute_dtype)
            if not accel.active:
                return accel
            self.warmup = accel.warm_up(kernels.warmup_sizes, kernels.warmup_batches or sorted({1, self.batch_size}))
            log.info("kernels warmed in %.1f s: %s", self.warmup.total_s, self.warmup.seconds)
            return accel
        except Exception:  # noqa: BLE001 - a worker without the fast kernels beats no worker
            log.exception("warming the GPU kernels failed: serving without them")
            self.generator = checkpoint.load_generator(self.model_dir, self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return acceleration.Accelerator(self.generator, acceleration.KernelSettings(), self.device,
                                            self.compute_dtype)

    def can_hand_off(self) -> bool:
        return self.device.type == "cuda" and self.store is not None

    def token_metrics(self, bytes_in: int, bytes_out: int) -> dict[str, int]:
        return {METRIC_TOKEN_BYTES_IN: bytes_in}  # the DiT+decoder's requests are token blobs (or references)

    def frame_tensor(self, segment: str, k: int, blob: wire.TokenBlob, cuda: dict | None,
                     source: tuple | None = None) -> torch.Tensor:
        """Frame k of a segment's blob on the device, from the cache when a previous pair brought it (a segment's
        bytes never change: it is written once under a fresh name). A device segment comes over whole on first use
        (one mapping of the encoder's memory for all its frames: mapping costs more than copying)."""
        cached = self.frames.get(segment, k)
        if cached is not None:
            return cached
        with self.timed("transfer"):
            if cuda:
                first = 0 if self.settings.frame_cache >= blob.num_frames else k
                count = min(blob.num_frames - first, max(self.settings.frame_cache, 1))
                frames = self.device_frames(blob, cuda, first, count)
                # each its own copy (device to device, fast), so the cache holds what it counts and no more
                got = {first + i: f.clone() if count > 1 else f for i, f in enumerate(frames)}
            elif source is not None:  # (open segment, payload offset): frame k alone, copied from the file
                got = {k: tokens.array_tensor(shm.read_frame(source[0], blob, source[1], k), self.device)}
            else:
                got = {k: tokens.array_tensor(blob.tokens[k], self.device)}
        self.frames.put(segment, got, last=k)  # frame k the most recently used
        return got[k]

    def parse(self, request, context, idx):
        key = "body" if request.get("body") is not None else "data"
        check_binary(context, idx, key)
        body = _as_bytes(request.get(key))
        if not body:
            raise RequestError("empty body: send the encoder's token blob as the request body")
        seed = parse_seed(request_header(context, idx, protocol.SEED))
        fmt = (request_header(context, idx, protocol.FORMAT) or protocol.FORMAT_PNG).lower()
        if fmt not in protocol.FORMATS:
            raise RequestError(f"X-Eden-Format must be png or raw, got {fmt[:20]!r}")
        blob, geo, t = self.pair_tokens(body, context, idx)
        return (geo, blob.dtype), (blob, t, seed, fmt)

    def device_frames(self, blob: wire.TokenBlob, cuda: dict, first: int, count: int) -> torch.Tensor:
        """Frames first..first+count-1 of a device segment's blob, copied from the encoder's GPU [count, 2, N, D]."""
        if self.device.type != "cuda":
            raise RequestError("these tokens were handed off on a GPU, which this CPU worker cannot read: ask the "
                               "encoder for host tokens (client --handoff host)", kind=protocol.HANDOFF_UNAVAILABLE)
        if cuda.get("nbytes") != blob.tokens.nbytes:
            raise RequestError(f"device segment: the descriptor hands off {cuda.get('nbytes')} bytes but the blob's "
                               f"tokens are {blob.tokens.nbytes}")
        frame_bytes = blob.tokens[0].nbytes
        try:
            t = handoff.import_copy(cuda, first * frame_bytes, (count, *blob.tokens.shape[1:]),
                                    getattr(torch, blob.dtype), self.device)
        except handoff.TokensGone as e:
            raise RequestError(f"{e}: encode the frames again", 410) from None
        except handoff.HandoffError as e:
            raise RequestError(f"cannot use the handed-off tokens: {e}", kind=protocol.HANDOFF_UNAVAILABLE) from None
        if not torch.isfinite(t).all():
            raise RequestError("tokens contain NaN or infinite values")
        return t

    def pair_tokens(self, body, context=None, idx: int = 0) -> tuple[wire.TokenBlob, pipeline.Geometry,
                                                                     torch.Tensor]:
        """The pair a body names (a blob, or a reference) -> its blob (checked against the model), geometry and
        tokens on the device [2, 2, N, D]."""
        ref = self.ref(body, context, idx) if shm.is_ref(body) else None
        if ref is None:  # the blob itself (device segments only come from this host's shared memory)
            blob = wire.from_bytes(body)
            geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
            with self.timed("transfer"):
                return blob, geo, tokens.tokens_tensor(blob, self.device)
        with contextlib.ExitStack() as leases:  # segments locked until their tokens are on this device
            try:
                return self.segment_pair(ref, leases)
            except shm.SegmentGone as e:
                raise RequestError(f"{e}: encode the frames again", 410) from None

    def segment_pair(self, ref: dict, leases: contextlib.ExitStack):
        if "segment" in ref:
            blob, cuda = shm.read_blob(leases.enter_context(self.store.lease(self.segment_of(ref, "body"))).read())
            geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
            with self.timed("transfer"):
                t = self.device_frames(blob, cuda, 0, 2) if cuda else tokens.tokens_tensor(blob, self.device)
            return blob, geo, t
        frames, difference = shm.pair_frames(ref)
        files = [leases.enter_context(self.store.lease(seg)) for seg, _ in frames]
        read = [shm.read_blob_head(f) for f in files]  # headers only: frames are read when not in the cache
        for (seg, k), (blob, _, _) in zip(frames, read):
            if k >= blob.num_frames:
                raise RequestError(f"frame {k} of segment {seg} does not exist (it holds {blob.num_frames})")
        (seg0, k0), (seg1, k1) = frames
        if seg0 == seg1 and k1 == k0 + 1:  # consecutive frames of one blob
            blob = read[0][0].window(k0, difference)
        else:  # the tokens come from frame_tensor, the blob is only checked
            blob = wire.TokenBlob.pair(read[0][0].frame(k0), read[1][0].frame(k1), difference, copy=False)
        geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
        t = torch.stack([self.frame_tensor(seg, k, b, cuda, (f, start))
                         for (seg, k), (b, cuda, start), f in zip(frames, read, files)])
        return blob, geo, t

    def run(self, items):
        blobs, tensors, seeds, formats = zip(*items)
        geo = tokens.check_fits(blobs[0], self.cfg)
        pairs = tokens.pair_batch(list(blobs), list(tensors), geo)
        seeds = [s if s is not None else secrets.randbelow(protocol.MAX_SEED) for s in seeds]
        noise = torch.cat([pipeline.make_noise(geo, self.cfg.latent_dim, s, self.device) for s in seeds])
        with self.stage("denoise"):
            latents = self.accel.sample_latents(pairs, noise)
        with self.stage("decode"):
            frames = pipeline.to_uint8(self.accel.decode_frames(pairs, latents))
        with self.stage("png"):
            out = []
            for f, seed, fmt in zip(frames.numpy(), seeds, formats):
                if fmt == protocol.FORMAT_RAW:
                    out.append((images.encode_raw(f), protocol.RAW_FRAME_CONTENT_TYPE, {protocol.SEED: str(seed)}))
                else:
                    out.append((images.encode_png(f, self.settings.png_compress_level), protocol.PNG_CONTENT_TYPE,
                                {protocol.SEED: str(seed)}))
            return out
