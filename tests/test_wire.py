"""The token wire format: round trips, pair assembly, and refusal of every malformed blob with a message."""
import json
import struct

import numpy as np
import pytest

from eden_serve import tokens, wire
from eden_serve.config import EdenConfig
from eden_serve.wire import TokenBlob, WireError

CFG = EdenConfig(hidden_dim=8, num_heads=1, encoder_fingerprint="abc")


def make_blob(k=2, h=40, w=70, dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    # 40x70 pads to 64x96 (left 13, right 13, top 12, bottom 12): a 4x6 grid of 16-pixel patches
    return TokenBlob(rng.standard_normal((k, 2, 24, 8)).astype(dtype), (h, w), (13, 13, 12, 12), 16,
                     list(rng.random(k) + 0.1), list(rng.random(k) + 0.1), list(rng.standard_normal(k - 1)), "abc")


def with_header(blob_bytes, **changes):
    magic, version, n = struct.unpack_from("<8sII", blob_bytes)
    header = json.loads(blob_bytes[16:16 + n])
    header.update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-(16 + len(new)) % 64)
    return struct.pack("<8sII", magic, version, len(new)) + new + blob_bytes[16 + n:]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(dtype):
    blob = make_blob(3, dtype=dtype)
    data = blob.to_bytes()
    assert len(data) == blob.nbytes and (len(data) - blob.tokens.nbytes) % 64 == 0
    back = wire.from_bytes(data)
    assert back.tokens.dtype == np.dtype(dtype) and np.array_equal(back.tokens, blob.tokens)
    assert back.header() == blob.header()
    assert back.grid == (4, 6) and back.padded_size == (64, 96)


def test_lead_difference_round_trip_and_bounds():
    """An answer to a request with a lead frame carries the lead's difference with frame 0 in its header; a blob
    without one writes the header it always did."""
    blob = make_blob(2)
    assert "lead_difference" not in blob.header()
    blob.lead_difference = -0.75
    back = wire.from_bytes(blob.to_bytes())
    assert back.lead_difference == -0.75 and back.differences == blob.differences
    for bad in ("x", float("nan"), 1e9):
        with pytest.raises(WireError, match="lead_difference"):
            wire.from_bytes(with_header(make_blob(2).to_bytes(), lead_difference=bad))


def test_pairs_from_frames_of_different_blobs():
    a, b = make_blob(3, seed=1), make_blob(2, seed=2)
    pair = TokenBlob.pair(a.frame(2), b.frame(0), 0.25)
    back = wire.from_bytes(pair.to_bytes())
    assert np.array_equal(back.tokens[0], a.tokens[2]) and np.array_equal(back.tokens[1], b.tokens[0])
    assert back.mean == [a.mean[2], b.mean[0]] and back.differences == [0.25]
    with pytest.raises(WireError, match="different size"):
        TokenBlob.pair(a.frame(0), make_blob(1, h=41).frame(0), 0.0)


def test_expected_nbytes_matches():
    blob = make_blob(2)
    assert wire.expected_nbytes(2, 40, 70, 8, "float16") == blob.tokens.nbytes
    # a 1080p pair in float16 at the released hidden size: about 50 MB
    assert 49e6 < wire.expected_nbytes(2, 1080, 1920, 768) < 51e6


GOOD = make_blob().to_bytes()


@pytest.mark.parametrize("data, message", [
    (b"", "shorter than the 16-byte prefix"),
    (b"\x89PNG\r\n\x1a\n" + bytes(100), "bad magic"),
    (GOOD[:8] + struct.pack("<I", 3) + GOOD[12:], "unsupported token format version 3"),
    (GOOD[:12] + struct.pack("<I", 2**31) + GOOD[16:], "header length 2147483648"),
    (GOOD[:16] + b"{not json" + GOOD[25:], "not valid JSON"),
    (GOOD[:-10], "truncated token blob"),
    (GOOD + b"\0" * 7, "7 unexpected trailing bytes"),
    (with_header(GOOD, dtype="int8"), "'dtype' must be one of .* in format version 1"),
    (with_header(GOOD, shape=[2, 3, 24, 8]), "shape must be"),
    (with_header(GOOD, shape=[1000, 2, 24, 8]), "shape must be"),
    (with_header(GOOD, size=[41, 70]), "is not the 4x6 grid"),
    (with_header(GOOD, grid=[3, 8]), "is not the 3x8 grid"),
    (with_header(GOOD, mean=[0.5, float("nan")]), "'mean' has values that are not finite"),
    (with_header(GOOD, std=[0.5, 0.0]), "'std' has values that are not finite and positive"),
    (with_header(GOOD, differences=[]), "'differences' must be a list of 1"),
    (with_header(GOOD, padding=[-1, 27, 12, 12]), "'padding' must be a list of 4 integers >= 0"),
    (with_header(GOOD, encoder=5), "'encoder' must be a string"),
])
def test_malformed_blobs_are_refused(data, message):
    with pytest.raises(WireError, match=message.replace("(", r"\(").replace("[", r"\[")):
        wire.from_bytes(data)


def test_check_fits():
    assert tokens.check_fits(wire.from_bytes(GOOD), CFG).grid == (4, 6)
    with pytest.raises(WireError, match="hidden size 8 but the loaded model has 16"):
        tokens.check_fits(make_blob(), EdenConfig(hidden_dim=16, num_heads=1))
    with pytest.raises(WireError, match="pair \\(2 frames\\), got 3"):
        tokens.check_fits(make_blob(3), CFG)
    with pytest.raises(WireError, match="encoder weights abc"):
        tokens.check_fits(make_blob(), EdenConfig(hidden_dim=8, num_heads=1, encoder_fingerprint="other"))
    with pytest.raises(WireError, match="over the limit of 100 pixels"):
        tokens.check_fits(make_blob(), CFG, max_pixels=100)
    odd = make_blob()
    odd.padding = (26, 0, 24, 0)
    with pytest.raises(WireError, match="is not this model's padding"):
        tokens.check_fits(wire.from_bytes(odd.to_bytes()), CFG)


def test_non_finite_tokens_are_refused():
    import torch
    blob = make_blob(dtype="float32")
    blob.tokens[1, 0, 3, 2] = np.inf
    with pytest.raises(WireError, match="NaN or infinite"):
        tokens.tokens_tensor(wire.from_bytes(blob.to_bytes()), torch.device("cpu"))


# ---------------------------------------------------------------------- 8-bit tokens (format version 2)
def int8_blob(k=2, seed=0):
    blob = make_blob(k, dtype="float32", seed=seed)
    blob.tokens = wire.quantize(blob.tokens)
    return blob


def test_int8_round_trip_version_and_pairs():
    import torch
    f32 = make_blob(3, dtype="float32")
    blob = int8_blob(3)
    data = blob.to_bytes()
    assert struct.unpack_from("<8sI", data)[1] == 2 and struct.unpack_from("<8sI", GOOD)[1] == 1
    assert blob.header()["shape"] == [3, 2, 24, 8] and blob.hidden_dim == 8 and blob.dtype == "int8"
    assert len(data) == blob.nbytes and blob.tokens.nbytes == 3 * 2 * 24 * (8 + 4)
    assert wire.expected_nbytes(3, 40, 70, 8, "int8") == blob.tokens.nbytes
    back = wire.from_bytes(data)
    assert back.header() == blob.header() and np.array_equal(back.tokens, blob.tokens)
    # error <= half a step of each token's own scale
    step = np.abs(f32.tokens).max(axis=-1, keepdims=True) / 127
    assert (np.abs(wire.dequantize(back.tokens) - f32.tokens) <= step / 2 + 1e-7).all()
    # frames and pairs slice the rows as with float tokens; torch and NumPy agree
    pair = wire.from_bytes(TokenBlob.pair(back.frame(2), back.frame(0), 0.5).to_bytes())
    assert np.array_equal(pair.tokens[0], blob.tokens[2])
    assert np.array_equal(tokens.quantize(torch.from_numpy(f32.tokens)).numpy(), blob.tokens)
    t = tokens.tokens_tensor(pair, torch.device("cpu"))
    assert torch.equal(tokens.dequantize(t), torch.from_numpy(wire.dequantize(pair.tokens)))
    assert tokens.check_fits(pair, CFG).grid == (4, 6)
    zero = wire.quantize(np.zeros((1, 2, 3, 8), np.float32))
    assert not wire.dequantize(zero).any() and not wire.scales(zero).any()


def with_scale(blob, value):
    bad = TokenBlob(blob.tokens.copy(), blob.size, blob.padding, blob.patch_size, blob.mean, blob.std,
                    blob.differences, blob.encoder)
    bad.tokens[1, 1, 5, -4:] = np.array([value], "<f4").view(np.int8)
    return bad.to_bytes()


@pytest.mark.parametrize("value, message", [(np.nan, "not finite"), (np.inf, "not finite"),
                                            (-0.5, "outside"), (1e7, "outside")])
def test_int8_malformed_scales_are_refused(value, message):
    import torch
    blob = int8_blob()
    with pytest.raises(WireError, match=message):
        wire.from_bytes(with_scale(blob, value))
    # what skips the reader (a shared-memory frame read alone) is checked where it is used
    rows = torch.from_numpy(np.frombuffer(with_scale(blob, value), np.int8)[-blob.tokens.nbytes:].copy()
                            .reshape(blob.tokens.shape))
    assert not tokens.finite(rows) and tokens.finite(torch.from_numpy(blob.tokens.copy()))
    with pytest.raises(WireError, match="scales"):
        tokens.array_tensor(rows.numpy(), torch.device("cpu"))


def test_int8_header_and_truncation():
    data = int8_blob().to_bytes()
    with pytest.raises(WireError, match="truncated"):
        wire.from_bytes(data[:-4])
    with pytest.raises(WireError, match="unexpected trailing"):  # a float16 reading of int8 rows
        wire.from_bytes(with_header(data, dtype="float16", shape=[2, 2, 24, 2]))
    with pytest.raises(WireError, match="in format version 1"):  # int8 needs version 2
        wire.from_bytes(data[:8] + struct.pack("<I", 1) + data[12:])
