"""TorchServe handler of eden_encoder: PNG/JPEG frames in, serialized tokens out (eden_serve.serving)."""
from eden_serve.serving import EncoderService


class EdenEncoderHandler(EncoderService):
    """Frames as multipart fields frame0, frame1, ...; field dtype (or header X-Eden-Token-Dtype) = float16|float32.
    See docs/http-api.md."""
