"""The part of TorchServe's handler context that the EDEN services use, for running them in process (tests and
benchmarks): system properties, the model-config's ``eden:`` settings, request headers, and what the answer set."""
from __future__ import annotations

from pathlib import Path


class HandlerContext:
    """``headers``: one dict for every request of the batch, or a list of them by request index. The answer's
    content type and headers land in ``answer_headers``, its statuses by request index in ``status``."""

    def __init__(self, model_dir: str | Path, eden: dict, headers: dict | list | None = None,
                 gpu_id: int | None = None, batch_size: int = 4):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": batch_size}
        self.model_yaml_config = {"eden": dict(eden)}
        self.metrics = None
        self.headers = headers if headers is not None else {}
        self.status: dict[int, int] = {}
        self.answer_headers: dict[str, str] = {}

    def get_all_request_header(self, idx):
        return self.headers[idx] if isinstance(self.headers, list) else self.headers

    def set_response_content_type(self, idx, value):
        self.answer_headers["Content-Type"] = value

    def set_response_header(self, idx, name, value):
        self.answer_headers[name] = value

    def set_response_status(self, code, phrase, idx=0):
        self.status[idx] = code
