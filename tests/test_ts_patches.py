"""The worker-side socket read that replaces TorchServe's (eden_serve/ts_patches.py)."""
import os
import socket
import threading

import pytest

from eden_serve import ts_patches


def test_read_exact_reads_the_bytes_sent_in_pieces():
    payload = os.urandom(3_000_001)
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: [a.sendall(payload[i:i + 65536]) for i in range(0, len(payload), 65536)])
    sender.start()
    assert ts_patches.read_exact(b, len(payload)) == payload
    sender.join()
    a.close()
    with pytest.raises(SystemExit):  # the frontend hung up: the worker exits, as TorchServe's own reader does
        ts_patches.read_exact(b, 10)
    b.close()


def test_apply_replaces_the_worker_reader():
    from ts.protocol import otf_message_handler
    original = otf_message_handler._retrieve_buffer
    try:
        assert ts_patches.apply()
        assert otf_message_handler._retrieve_buffer is ts_patches.read_exact
    finally:
        otf_message_handler._retrieve_buffer = original
