"""The DiT+decoder's TorchServe service: a pair's tokens in (a blob, or shared-memory references to token segments
and to tokens handed off on the encoder's GPU), the middle frame out (PNG or raw)."""
from __future__ import annotations

import contextlib
import logging
import secrets
from collections import OrderedDict

import torch

from . import acceleration, checkpoint, framerefs, handoff, images, pipeline, protocol, shm, tokens, wire
from .frame_cache import DeviceFrameCache
from .service import (METRIC_FRAME_REF_HITS, METRIC_FRAME_REF_MISSES, METRIC_TOKEN_BYTES_IN, BatchService,
                      RequestError, _as_bytes, check_binary, parse_seed, request_header)

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
        # frames received in pair bodies (eden_serve/framerefs.py), by hash: (one-frame blob whose tokens are only a
        # shape, tokens on the device [2, N, D]); least recently used first, at most http_frame_cache_bytes
        self.http_frames: OrderedDict[str, tuple[wire.TokenBlob, torch.Tensor]] = OrderedDict()
        self.http_frames_bytes = 0
        # ... and shared with this host's other DiT+decoder workers, in a folder of their own beside shm_dir
        share = self.settings.http_frame_share and self.settings.shm_dir
        self.frame_store = self.open_store(self.settings.shm_dir.rstrip("/") + "-frames") if share else None
        self.accel = self.accelerate()

    def accelerate(self) -> acceleration.Accelerator:
        """The GPU kernels of the settings, compiled and warmed for the configured sizes now, before any request;
        if that fails, the worker serves without them (and says why in its log)."""
        kernels = acceleration.KernelSettings.from_mapping(self.settings)  # (a bad value stops the worker)
        try:
            accel = acceleration.Accelerator(self.generator, kernels, self.device, self.compute_dtype)
            if not accel.active:
                return accel
            # every batch size up to batchSize: TorchServe forms smaller batches whenever fewer pairs are waiting,
            # and a graph captured on a user's request costs that request (measured: a first 480p run twice as
            # slow as the next when only batches 1 and 4 were warmed; bench/NOTES.md, session 5)
            batches = kernels.warmup_batches or range(1, self.batch_size + 1)
            self.warmup = accel.warm_up(kernels.warmup_sizes, batches)
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
        except handoff.CopyFailed as e:  # this worker's fault, not the request's: a retry may land on a sound one
            raise RequestError(str(e), 503) from None
        if not tokens.finite(t):
            raise RequestError("tokens contain NaN or infinite values (or int8 scales out of range)")
        return t

    def pair_tokens(self, body, context=None, idx: int = 0) -> tuple[wire.TokenBlob, pipeline.Geometry,
                                                                     torch.Tensor]:
        """The pair a body names (a blob, or a reference) -> its blob (checked against the model), geometry and
        tokens on the device [2, 2, N, D]."""
        if framerefs.is_pair_body(body):  # frames inline or named by hash (over HTTP, across hosts)
            return self.http_pair(body)
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

    def handle(self, data: list[dict], context) -> list:
        """As BatchService.handle, after keeping the inline frames of every pair body of the batch: a pair sent at
        the same time as the one carrying a frame it names finds that frame whatever their order in the batch."""
        self._inline_frames = {}
        for request in data:
            body = request.get("body") if request.get("body") is not None else request.get("data")
            if isinstance(body, (bytes, bytearray)) and framerefs.is_pair_body(body):
                try:
                    self._inline_frames[id(body)] = self.inline_frames(body)
                except Exception:  # noqa: BLE001 - refused with its reason when its turn comes (parse)
                    pass
        try:
            return super().handle(data, context)
        finally:
            self._inline_frames = {}

    def inline_frames(self, body) -> tuple[list, float]:
        """Parse a pair body and keep its inline frames (checked; shared with this host's other workers) ->
        ([(hash, (meta, tokens) or None)], difference)."""
        frames, difference = framerefs.parse(body)
        got = []
        for f in frames:
            if f.blob is None:
                got.append((f.hash, None))
                continue
            got.append((f.hash, self.keep_frame(f.hash, f.blob)))
            self.share_frame(f.hash, f.data)
        return got, difference

    def keep_frame(self, key: str, blob: wire.TokenBlob) -> tuple[wire.TokenBlob, torch.Tensor]:
        """A one-frame blob received over HTTP -> (meta, tokens on the device), checked and kept under ``key``."""
        meta = blob.frame(0)
        tokens.check_fits(wire.TokenBlob.pair(meta, meta, 0.0, copy=False), self.cfg,
                          self.settings.max_pixels)  # (the frame alone, as half of a pair)
        t = tokens.array_tensor(blob.tokens[0], self.device)  # (before the batch's stages are timed)
        meta.tokens = wire.shape_only(meta.tokens.shape, meta.dtype)  # (keeps no view of the body)
        self.http_frame(key, meta, t)
        return meta, t

    def http_pair(self, body) -> tuple[wire.TokenBlob, pipeline.Geometry, torch.Tensor]:
        """A pair body (eden_serve/framerefs.py) -> the pair's blob, geometry and tokens on the device. Inline frames
        are checked and kept (``http_frame``; ``handle`` has kept those of the whole batch first); a frame named by
        hash that neither this worker nor another of its host (``shared_frame``) holds answers 409 FrameNotCached."""
        pre = getattr(self, "_inline_frames", {}).pop(id(body), None)
        parsed, difference = pre if pre is not None else self.inline_frames(body)
        got = [entry if entry is not None else self.http_frame(h) or self.shared_frame(h) for h, entry in parsed]
        missing = [h for (h, _), g in zip(parsed, got) if g is None]
        named = sum(entry is None for _, entry in parsed)
        if named > len(missing):
            self.count(METRIC_FRAME_REF_HITS, named - len(missing))
        if missing:
            self.count(METRIC_FRAME_REF_MISSES, len(missing))
            raise RequestError(f"frame(s) {', '.join(missing)} are not in this worker's frame cache: send the pair "
                               "again with both frames inline", 409, framerefs.FRAME_NOT_CACHED)
        (m0, t0), (m1, t1) = got
        blob = wire.TokenBlob.pair(m0, m1, difference, copy=False)
        geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
        return blob, geo, torch.stack([t0, t1])

    # ------------------------------------------------------------------ frames shared by this host's workers
    # Each worker has its own frame cache, and TorchServe gives a request to whichever worker is free: with W workers
    # a frame named by hash would be where the pair lands about 1/W of the time. So a frame received inline is also
    # written under its hash to a shared-memory folder of the host's DiT+decoder workers ("<shm_dir>-frames": a
    # tmpfs write, ~5 ms for a 1080p frame, against ~0.3 s to send it through TorchServe's frontend again), and a
    # worker that does not hold a named frame reads it from there.
    def stores(self) -> list[shm.ShmStore]:
        return super().stores() + ([self.frame_store] if self.frame_store is not None else [])

    def sharing(self) -> bool:
        return self.frame_store is not None

    def share_frame(self, key: str, data) -> None:
        if not self.sharing() or data is None:
            return
        try:
            self.frame_store.write(data, name=framerefs.segment_name(key))
        except shm.ShmError as e:  # full (shm_quota_bytes) or unusable: this worker's own cache still has it
            log.debug("frame %s not shared with the other workers: %s", key, e)

    def shared_frame(self, key: str) -> tuple[wire.TokenBlob, torch.Tensor] | None:
        """A frame another worker of this host received (``share_frame``), checked and kept here; None if none."""
        if not self.sharing():
            return None
        try:
            data = self.frame_store.read(framerefs.segment_name(key))
        except shm.ShmError:
            return None
        if framerefs.frame_hash(data) != key:  # whoever can write to the folder could have put anything there
            log.warning("shared frame %s does not have that hash: ignored", key)
            return None
        try:
            return self.keep_frame(key, framerefs.one_frame(data))
        except (wire.WireError, RequestError) as e:
            log.warning("shared frame %s refused: %s", key, e)
            return None

    def unshare_frame(self, key: str) -> None:
        if self.sharing():
            self.frame_store.unlink(framerefs.segment_name(key))

    def http_frame(self, key: str, meta: wire.TokenBlob | None = None, t: torch.Tensor | None = None):
        """With ``meta`` and ``t``: keep a frame received over HTTP under its hash (least recently used frames
        dropped past http_frame_cache_bytes; a frame larger than that is not kept). Without: the frame kept under
        ``key`` as (meta, tokens), or None."""
        if meta is None:
            entry = self.http_frames.get(key)
            if entry is not None:
                self.http_frames.move_to_end(key)
            return entry
        nbytes = t.numel() * t.element_size()
        if key in self.http_frames:
            self.http_frames.move_to_end(key)
            return None
        if nbytes > self.settings.http_frame_cache_bytes:
            return None
        self.http_frames[key] = (meta, t)
        self.http_frames_bytes += nbytes
        while self.http_frames_bytes > self.settings.http_frame_cache_bytes:
            old_key, (_, old) = self.http_frames.popitem(last=False)
            self.http_frames_bytes -= old.numel() * old.element_size()
            self.unshare_frame(old_key)  # (the host's copies are bounded by the workers' caches)
        return None

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

    def host_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """The batch's frames [B, C, H, W] in [0, 1] -> [B, H, W, 3] uint8 in host memory. On a GPU through pinned
        memory (a copy into ordinary memory took 5.7 ms for four 1080p frames in a profile of a live worker, about
        4.4 GB/s; pinned memory takes the GPU's full copy speed), from PyTorch's cache of pinned blocks: a block is
        used again only once the answers holding it are gone."""
        if self.device.type != "cuda":
            return pipeline.to_uint8(frames)
        b, _, h, w = frames.shape
        host = torch.empty((b, h, w, 3), dtype=torch.uint8, pin_memory=True)
        pipeline.to_uint8(frames, out=host)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def run(self, items):
        blobs, tensors, seeds, formats = zip(*items)
        geo = tokens.check_fits(blobs[0], self.cfg)
        pairs = tokens.pair_batch(list(blobs), list(tensors), geo)
        seeds = [s if s is not None else secrets.randbelow(protocol.MAX_SEED) for s in seeds]
        noise = torch.cat([pipeline.make_noise(geo, self.cfg.latent_dim, s, self.device) for s in seeds])
        with self.stage("denoise"):
            latents = self.accel.sample_latents(pairs, noise)
        with self.stage("decode"):
            frames = self.host_frames(self.accel.decode_frames(pairs, latents))
        with self.stage("png"):
            out = []
            for f, seed, fmt in zip(frames.numpy(), seeds, formats):
                if fmt == protocol.FORMAT_RAW:
                    out.append((images.encode_raw(f), protocol.RAW_FRAME_CONTENT_TYPE, {protocol.SEED: str(seed)}))
                else:
                    out.append((images.encode_png(f, self.settings.png_compress_level), protocol.PNG_CONTENT_TYPE,
                                {protocol.SEED: str(seed)}))
            return out
