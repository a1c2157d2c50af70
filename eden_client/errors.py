"""The error of a request to the served models, shared by the key source, the per-model client and the
two-model client."""


class ServeError(RuntimeError):
    """A request the server refused or could not answer; ``status`` is the HTTP code (0: no answer)."""

    def __init__(self, message: str, status: int = 0, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind  # the server's error "type", if it said
