"""The encoder's TorchServe service: frames in, token blobs out (over HTTP, through shared memory, or kept on its
GPU for the DiT+decoder to copy: the device handoff)."""
from __future__ import annotations

import logging

import numpy as np
import torch

from . import checkpoint, handoff, images, pipeline, protocol, shm, tokens, wire
from .held_tokens import HeldTokens
from .service import (FRAME_FIELD, METRIC_TOKEN_BYTES_OUT, BatchService, RequestError, _as_bytes, _text,
                      check_binary, parse_token_dtype, request_header)

log = logging.getLogger(__name__)


class EncoderService(BatchService):
    """Frames (multipart fields frame0, frame1, ... as PNG/JPEG/raw, or shared-memory references to them) -> a token
    blob (application/x-eden-tokens) of all of them.

    Form field ``dtype`` (or header X-Eden-Token-Dtype): float16 (default), float32 or int8 tokens (8-bit with a
    scale per token, wire format version 2). Form field ``lead`` = 1: frame0 is a lead frame, sent only for the
    difference input between it and frame1 (the blob's ``lead_difference``); it gets no tokens.
    """

    def load(self):
        self.encoder = checkpoint.load_encoder(self.model_dir, self.device)
        # handed-off tokens, kept on this GPU until their segment is released or expires (eden_serve/held_tokens.py)
        self.held = HeldTokens(self.store, self.settings.handoff_max_bytes)
        self.hands_off = (self.settings.device_handoff and self.store is not None  # (the device handoff is on)
                          and handoff.available(self.device))
        if self.hands_off:
            self.held.start_reaper()

    def parse(self, request, context, idx):
        s = self.settings
        odd = [k for k in request if isinstance(k, str) and k.startswith("frame") and not FRAME_FIELD.fullmatch(k)]
        if odd:
            raise RequestError(f"field {odd[0][:40]!r} is not a frame field: frame0, frame1, ... (ASCII digits)")
        names = sorted((k for k in request if isinstance(k, str) and FRAME_FIELD.fullmatch(k)),
                       key=lambda k: int(k[5:]))
        if not names:
            raise RequestError("no frames: send the images as multipart/form-data fields frame0, frame1, ...")
        if names != [f"frame{i}" for i in range(len(names))]:
            raise RequestError(f"frame fields must be numbered frame0..frame{len(names) - 1} without gaps, got {names}")
        if len(names) > s.max_frames:
            raise RequestError(f"{len(names)} frames in one request: at most {s.max_frames}", 413)
        dtype = parse_token_dtype(request.get("dtype") or request_header(context, idx, protocol.TOKEN_DTYPE),
                                  s.token_dtype)
        lead = _text(request.get("lead"))
        if lead not in (None, "", "0", "1"):
            raise RequestError(f"field 'lead' must be 0 or 1, got {lead[:20]!r}")
        lead = lead == "1"
        if lead and len(names) < 2:
            raise RequestError("a lead frame (field 'lead' = 1) needs a frame after it")
        for n in names:
            check_binary(context, idx, n)
        frames = [self.frame(request[n], n, context, idx) for n in names]
        h, w = frames[0].shape[:2]
        for name, f in zip(names[1:], frames[1:]):
            if f.shape[:2] != (h, w):
                raise RequestError(f"{name} is {f.shape[1]}x{f.shape[0]} but frame0 is {w}x{h}: "
                                   "all frames of a request must have one size")
        size = wire.expected_nbytes(len(frames) - lead, h, w, self.cfg.hidden_dim, dtype, self.cfg.pad_multiple,
                                    self.cfg.patch_size) + wire.MAX_HEADER_BYTES
        to_shm = self.wants_shm(context, idx)
        if size > s.max_response_bytes and not to_shm:  # a shared-memory reply is a reference, not the bytes
            raise RequestError(f"the tokens of {len(frames)} frames of {w}x{h} would be {size} bytes, over the "
                               f"response limit of {s.max_response_bytes}: send fewer frames per request", 413)
        on_device = (to_shm and self.hands_off
                     and (request_header(context, idx, protocol.HANDOFF) or "") == protocol.HANDOFF_DEVICE)
        # the frames as they are: run() gathers every request's straight into the upload buffer (one copy each)
        return (h, w, dtype), (frames, dtype, "device" if on_device else "shm" if to_shm else "", lead)

    def frame(self, raw, name: str, context, idx: int) -> np.ndarray | torch.Tensor:
        """One frame field -> [H, W, 3] uint8. A raw frame in a shared-memory segment is read straight into a host
        tensor (page-locked on a GPU, ready for the upload): one copy, checked from its header first. Anything else
        (PNG, JPEG, raw bytes in the body) is decoded as it is."""
        s = self.settings
        data = _as_bytes(raw)
        if data is None or not shm.is_ref(data):
            return images.decode_image(data, s.max_pixels, s.min_side, name)
        ref = self.ref(data, context, idx)  # (refused with a message first when shared memory is off here)
        with self.store.open(self.segment_of(ref, name)) as seg:
            head = seg.read(0, min(seg.size, images.RAW_HEADER.size))
            if not images.is_raw(head):
                return images.decode_image(seg.read(), s.max_pixels, s.min_side, name)
            h, w = images.raw_size(bytes(head), seg.size, s.max_pixels, s.min_side, name)
            host = torch.empty((h, w, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            seg.readinto(host.numpy(), images.RAW_HEADER.size)
            return host

    def run(self, items):
        with self.stage("encode"):
            frames = self.upload([frame for f, *_ in items for frame in f])  # [K, H, W, C] uint8 on the device
            x = frames.float().div_(255).permute(0, 3, 1, 2)  # [K, C, H, W] channels-last
            leads = [lead for *_, lead in items]
            encoded, differences = pipeline.encode_frames(self.encoder, x, [len(f) for f, *_ in items], leads)
        with self.stage("serialize"):
            geo = pipeline.Geometry.for_size(x.shape[-2], x.shape[-1], self.cfg)
            dtype = items[0][1]
            gpu = tokens.wire_tensor(encoded, dtype)  # [K, 2, N, D] (int8: [K, 2, N, D + 4])
            finite = tokens.finite(gpu)
            metas = tokens.blob_metas(encoded, differences, geo, dtype, self.cfg.encoder_fingerprint, leads)
            bodies, start = [], 0
            try:
                with self.timed("transfer"):
                    for meta, (_, _, reply, _) in zip(metas, items):
                        part = gpu[start:start + meta.num_frames]
                        start += meta.num_frames
                        if reply == "device" and (segment := self.hand_off(  # held: its own memory, not the batch's
                                meta, part if len(items) == 1 else part.clone())):
                            bodies.append(segment)
                        elif reply:
                            bodies.append(self.write_tokens(meta, part))
                        else:
                            bodies.append([meta.header_bytes(), memoryview(part.cpu().numpy()).cast("B")])
                tokens.check_finite(gpu, bool(finite))  # (a synchronisation: the handed-off tokens are final)
            except BaseException as e:  # nothing written for this batch outlives it
                for body in bodies:
                    if isinstance(body, shm.Segment):
                        self.store.unlink(body.name)
                        self.held.drop(body.name)
                if isinstance(e, shm.ShmFull):
                    raise RequestError(str(e), 507) from None
                if isinstance(e, OSError):  # e.g. the shared-memory folder is full: worth a retry later
                    raise RequestError(f"cannot write the tokens to shared memory: {shm._reason(e)}", 507) from None
                if isinstance(e, OverflowError):
                    raise RequestError(str(e)) from None
                raise
            return [(body, protocol.TOKENS_CONTENT_TYPE, {}) for body in bodies]

    def upload(self, frames: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """The requests' frames, each [H, W, C] uint8 (arrays decoded from the bodies, or host tensors read from
        shared memory by ``frame``) -> one [K, H, W, C] uint8 tensor on the device. On a GPU every frame is copied
        from page-locked host memory without blocking the host (from pageable memory the driver copies twice and
        the copy holds the host thread: 17% of the encoder's GPU time at 1080p in session 6's profile): frames read
        from shared memory are there already, decoded ones are gathered into one such buffer first. PyTorch's
        pinned-memory cache reuses the buffers once their copies are done."""
        if self.device.type == "cuda" and all(isinstance(f, torch.Tensor) for f in frames):
            out = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, device=self.device)
            for dst, f in zip(out, frames):
                dst.copy_(f, non_blocking=True)
            return out
        arrays = [f.numpy() if isinstance(f, torch.Tensor) else f for f in frames]
        if self.device.type != "cuda":
            return torch.from_numpy(np.stack(arrays)).to(self.device)
        host = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(arrays, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def can_hand_off(self) -> bool:
        return self.hands_off

    def token_metrics(self, bytes_in: int, bytes_out: int) -> dict[str, int]:
        return {METRIC_TOKEN_BYTES_OUT: bytes_out}  # the encoder's answers are token blobs

    def hand_off(self, meta: wire.TokenBlob, part: torch.Tensor) -> shm.Segment | None:
        """Keep ``part`` on the GPU and write a device segment naming it; None if it must go to the host instead
        (the held memory is at its limit, or this GPU memory cannot be exported)."""
        nbytes = part.numel() * part.element_size()
        if not self.held.has_room(nbytes):
            log.info("handed-off tokens at the %d-byte limit: these go through host memory", self.held.max_bytes)
            return None
        try:
            desc = handoff.export(part)
        except handoff.HandoffError as e:
            log.warning("device handoff off for this worker, tokens go through host memory: %s", e)
            self.hands_off = False
            return None
        body = shm.device_segment(meta, desc)
        name, fd = self.store.write_held(body)
        self.held.add(name, part, nbytes, fd)
        return shm.Segment(name, len(body))

    def write_tokens(self, meta: wire.TokenBlob, part: torch.Tensor) -> shm.Segment:
        """A blob straight into a new shared-memory segment: the device copies the tokens into it (no host
        buffer in between)."""
        head = meta.header_bytes()
        nbytes = len(head) + part.numel() * part.element_size()
        with self.store.allocate(nbytes) as (name, view):
            view[:len(head)] = head
            dst = np.frombuffer(view, dtype=wire.DTYPES[meta.dtype], offset=len(head)).reshape(meta.tokens.shape)
            torch.from_numpy(dst).copy_(part)
            del dst
        return shm.Segment(name, nbytes)
