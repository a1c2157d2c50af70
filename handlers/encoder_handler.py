"""TorchServe handler of eden_encoder: PNG/JPEG frames in, serialized tokens out (eden_serve.serving)."""
from eden_serve.serving import EncoderService


class EdenEncoderHandler(EncoderService):
    """Frames as multipart fields frame0, frame1, ...; ?dtype=float16|float32. See README.md, "The HTTP API"."""
