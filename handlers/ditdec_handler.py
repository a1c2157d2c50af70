"""TorchServe handler of eden_ditdec: a pair's tokens in, the interpolated frame (PNG) out (eden_serve.serving)."""
from eden_serve.serving import DitDecService


class EdenDitDecHandler(DitDecService):
    """The encoder's token blob as the raw body; headers X-Eden-Seed: N, X-Eden-Format: png|raw. See docs/http-api.md."""
