"""Times the official EDEN code itself next to bench/reference.py, on the same frames, in one process:

    python bench/official_loop.py --official-dir .official/EDEN [--checkpoint eden.pt] [--sizes 480x854,1080x1920]
        [--frames 21,11] [--variants xformers,no_xformers] [--repeats 2] [--device cuda:0] [--out FILE]

--official-dir is a checkout of github.com/bbldCVer/EDEN (its inference.py, src/ and configs/); it is never
committed (``.official/`` is git-ignored) and its modules are imported from there. Pure-Python packages it needs
that the host lacks (torchdiffeq, PyYAML) are looked for, after the installed ones, in --pylib (default: ``pylib``
next to the checkout). Modules the inference path imports but never uses (lpips, flolpips: metrics and training
losses; scipy.integrate: torchdiffeq's SciPy solver) are stubbed only when they are absent, and so is xformers:
``memory_efficient_attention`` becomes ``F.scaled_dot_product_attention``. Nothing in the checkout is edited.

What runs, per size, on a clip of --frames frames already in memory (``eden_dev.samples.moving_shapes``, as
bench/speed.py):
- official: the model built as inference.py builds it (``load_model`` with configs/eval_eden.yaml's ``model_args``,
  the architecture sizes taken from the checkpoint), the checkpoint loaded with ``load_state_dict(ckpt["eden"])``;
  inference.py's own ``transport`` / ``sampler`` / ``sample_fn`` statements, its ``interpolate`` function and its
  video loop (the ``for`` over the pairs: upload, interpolate, both frames back to the host, ``empty_cache``) are
  taken from its source and executed unchanged, over the clip as float frames in [0, 1] (what its
  ``read_video`` branch makes). Variants: ``xformers`` (the release's setting, ``use_xformers: true``: xformers or
  its SDPA stand-in) and ``no_xformers`` (the code's own fallback: matmul, softmax, matmul).
- reference: bench/reference.py as bench/speed.py times it (``reference.time_clip``), with the same noise per pair.
One untimed warm-up pair each; --repeats alternates the runs and the smallest time is reported with all of them.
The generated frames of the official loop and the reference are compared (same noise): max difference in 8-bit
levels and PSNR. Seconds per generated frame; prints JSON (and writes it to --out).
"""
from __future__ import annotations

import argparse
import ast
import builtins
import importlib
import json
import sys
import time
import types
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from reference import load_reference, time_clip  # noqa: E402

from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import checkpoint, pipeline  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402

SEED = 0


# ------------------------------------------------------------------ the official code
def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__stub__ = True
    sys.modules[name] = mod
    return mod


def _unused(what: str):
    class Unused(torch.nn.Module):
        def __init__(self, *a, **k):
            raise RuntimeError(f"{what} is stubbed by bench/official_loop.py (not installed, not used by inference)")
    return Unused


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def _sdpa_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None, **_):
    """xformers' ``memory_efficient_attention`` on [B, M, H, K] tensors, done by SDPA (which wants [B, H, M, K])."""
    if attn_bias is not None:
        raise NotImplementedError("attn_bias (the official code passes none)")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p,
                                         scale=scale)
    return out.transpose(1, 2)


def import_official(official_dir: Path, pylib: Path | None) -> dict:
    """Put the checkout on sys.path, stub what is absent and unused, import the modules inference.py imports.
    Returns them and what was stubbed."""
    if not (official_dir / "inference.py").is_file() or not (official_dir / "src" / "models" / "EDEN.py").is_file():
        raise SystemExit(f"--official-dir {official_dir}: not a checkout of bbldCVer/EDEN (no inference.py, "
                         f"src/models/EDEN.py)")
    sys.path.insert(0, str(official_dir))
    if pylib and pylib.is_dir():
        sys.path.append(str(pylib))  # after the installed packages: those win
    stubbed = []
    if not _importable("lpips"):
        _stub("lpips", LPIPS=_unused("lpips.LPIPS"))
        stubbed.append("lpips")
    if not _importable("flolpips.flolpips"):  # the checkout's flolpips/ needs cv2 and torchvision
        _stub("flolpips", __path__=[])
        sys.modules["flolpips"].flolpips = _stub("flolpips.flolpips", Flolpips=_unused("flolpips.Flolpips"))
        stubbed.append("flolpips")
    if not _importable("scipy.integrate"):  # torchdiffeq imports solve_ivp for its "scipy_solver" method only
        def solve_ivp(*a, **k):
            raise RuntimeError("scipy is stubbed by bench/official_loop.py")
        scipy = sys.modules.get("scipy") or _stub("scipy", __path__=[])
        scipy.integrate = _stub("scipy.integrate", solve_ivp=solve_ivp)
        stubbed.append("scipy.integrate")
    if _importable("xformers.ops"):
        attention = "xformers"
    else:
        _stub("xformers", __path__=[])
        sys.modules["xformers"].ops = _stub("xformers.ops", memory_efficient_attention=_sdpa_memory_efficient_attention)
        attention = "SDPA stand-in for xformers.ops.memory_efficient_attention"
        stubbed.append("xformers")
    for name in ("torchdiffeq", "yaml", "einops"):
        if not _importable(name):
            raise SystemExit(f"the official code needs {name}: install it or put it in --pylib ({pylib})")
    import yaml
    from src.models import load_model
    from src.transport import Sampler, create_transport
    from src.utils import InputPadder
    src_file = sys.modules["src.models"].__file__
    if not Path(src_file).resolve().is_relative_to(official_dir.resolve()):
        raise SystemExit(f"'src' was imported from {src_file}, not from --official-dir")
    import torchdiffeq
    return {"yaml": yaml, "load_model": load_model, "Sampler": Sampler, "create_transport": create_transport,
            "InputPadder": InputPadder, "stubbed": stubbed, "attention": attention,
            "torchdiffeq": getattr(torchdiffeq, "__version__", "?")}


def inference_parts(official_dir: Path):
    """From inference.py's source: the sampler statements, ``interpolate``, and the video loop's ``for`` over the
    pairs, each compiled unchanged."""
    path = official_dir / "inference.py"
    tree = ast.parse(path.read_text(), str(path))
    sampler = [n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
               and isinstance(n.targets[0], ast.Name) and n.targets[0].id in ("transport", "sampler", "sample_fn")]
    func = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "interpolate"]

    def calls_interpolate(node):
        return any(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == "interpolate"
                   for c in ast.walk(node))

    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and calls_interpolate(n)]
    if [getattr(n.targets[0], "id", None) for n in sampler] != ["transport", "sampler", "sample_fn"] \
            or len(func) != 1 or len(loops) != 1:
        raise SystemExit(f"{path}: did not find the sampler statements, interpolate() and the video loop "
                         f"(has inference.py changed?)")

    def code(nodes, what):
        return compile(ast.Module(body=nodes, type_ignores=[]), f"{path}:{what}", "exec")

    return code(sampler, "sampler"), code(func, "interpolate"), code(loops, "video loop")


class Official:
    """The official model, sampler and loop, executed in one namespace as inference.py's globals."""

    def __init__(self, official_dir: Path, mods: dict, ckpt_path: Path, sd_cfg: EdenConfig, device):
        with open(official_dir / "configs" / "eval_eden.yaml") as f:  # inference.py's default --config
            config = mods["yaml"].unsafe_load(f)
        if sd_cfg.patch_size != 16:
            raise SystemExit("the official EDEN.denoise assumes 16-pixel patches")
        model_args = dict(config["model_args"])
        model_args.update(in_dim=sd_cfg.in_dim, out_dim=sd_cfg.out_dim, patch_size=sd_cfg.patch_size,
                          latent_dim=sd_cfg.latent_dim, hidden_dim=sd_cfg.hidden_dim, num_heads=sd_cfg.num_heads,
                          mlp_ratio=sd_cfg.mlp_ratio, dit_depth=sd_cfg.dit_depth, decoder_depth=sd_cfg.decoder_depth,
                          qkv_bias=sd_cfg.qkv_bias)
        self.model_args = model_args
        eden = mods["load_model"](config["model_name"], **model_args)
        ckpt = torch.load(ckpt_path, map_location="cpu")
        eden.load_state_dict(ckpt["eden"])
        eden.to(device)
        eden.eval()
        del ckpt
        self.eden = eden
        args = Namespace(**{**config, "model_args": model_args})
        self.ns = {"__builtins__": builtins, "__name__": "official_inference", "torch": torch, "args": args,
                   "device": device, "eden": eden, "InputPadder": mods["InputPadder"],
                   "create_transport": mods["create_transport"], "Sampler": mods["Sampler"]}
        sampler_code, interpolate_code, self.loop_code = inference_parts(official_dir)
        exec(sampler_code, self.ns)
        exec(interpolate_code, self.ns)
        self.device = device

    def use_xformers(self, on: bool) -> None:
        """The ``use_xformers`` flag each official Attention module reads at every call."""
        for m in self.eden.modules():
            if hasattr(m, "use_xformers"):
                m.use_xformers = on

    def run(self, video_frames: torch.Tensor) -> list:
        """inference.py's video loop over float frames [N, C, H, W] on the host; returns its output list."""
        self.ns.update(video_frames=video_frames, frames_num=video_frames.shape[0], interpolated_video=[])
        exec(self.loop_code, self.ns)
        return self.ns["interpolated_video"]


# ------------------------------------------------------------------ timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_official(official: Official, clip: list) -> tuple[float, list]:
    video = torch.from_numpy(np.stack(clip)).float().permute(0, 3, 1, 2) / 255.  # as inference.py after read_video
    official.run(video[:2])  # warm-up pair
    torch.manual_seed(SEED)  # interpolate() draws its noise from the global CPU generator
    sync(official.device)
    t = time.perf_counter()
    out = official.run(video)
    sync(official.device)
    seconds = (time.perf_counter() - t) / (len(clip) - 1)
    generated = [pipeline.to_uint8(f)[0].numpy() for f in out[1::2]]  # out: frame 0, middle, frame 1, middle, ...
    return seconds, generated


def time_reference(model, clip: list, latent_tokens: int, latent_dim: int, device) -> tuple[float, list]:
    """bench/speed.py's measure, with the official loop's noise: the same global-generator draws, in order."""
    warm = [True]

    def noise_for(i):
        if warm[0] and i == 0:  # time_clip's warm-up pair: draw, then start the timed pairs from the seed
            warm[0] = False
            noise = torch.randn([1, latent_tokens, latent_dim]).to(device)
            torch.manual_seed(SEED)
            return noise
        return torch.randn([1, latent_tokens, latent_dim]).to(device)

    return time_clip(model, clip, noise_for, device)


def compare(a: list, b: list) -> dict:
    diff = max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a, b))
    mse = np.mean([np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2) for x, y in zip(a, b)])
    psnr = 100.0 if mse == 0 else min(100.0, float(10 * np.log10(255 ** 2 / mse)))  # capped, as bench/speed.py
    return {"max_abs_diff_8bit": diff, "psnr_db": psnr}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-dir", required=True, type=Path, help="checkout of bbldCVer/EDEN (e.g. .official/EDEN)")
    ap.add_argument("--pylib", type=Path, default=None,
                    help="folder of pure-Python packages for the official code (default: pylib next to the checkout)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="official-layout checkpoint (default: the random real-size one bench/speed.py makes)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/eden_speed"), help="where the random checkpoint lives")
    ap.add_argument("--sizes", default="480x854,1080x1920")
    ap.add_argument("--frames", default="21,11", help="clip length per size (generated frames: one fewer)")
    ap.add_argument("--variants", default="xformers,no_xformers",
                    help="official attention paths: xformers (the release's setting; SDPA if xformers is absent), "
                         "no_xformers (the code's own matmul-softmax fallback)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the smallest is reported")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    official_dir = args.official_dir.resolve()
    pylib = args.pylib or official_dir.parent / "pylib"
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - {"xformers", "no_xformers"}:
        raise SystemExit(f"--variants: xformers, no_xformers (got {args.variants})")
    device = torch.device(args.device)

    mods = import_official(official_dir, pylib)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.workdir / "eden_random.pt"
        if not ckpt.exists():
            args.workdir.mkdir(parents=True, exist_ok=True)
            checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    sd = checkpoint.read_official_checkpoint(ckpt)
    cfg = EdenConfig.from_state_dict(sd)
    official = Official(official_dir, mods, ckpt, cfg, device)
    reference = load_reference(sd, cfg, device)
    del sd

    commit = None
    head = official_dir / ".git" / "HEAD"
    if (official_dir / "COMMIT").is_file():
        commit = (official_dir / "COMMIT").read_text().strip()
    elif head.is_file():
        commit = head.read_text().strip()
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "official_dir": str(official_dir), "official_commit": commit,
               "official_attention": mods["attention"], "stubbed": mods["stubbed"], "torchdiffeq": mods["torchdiffeq"],
               "model_args": official.model_args,
               "checkpoint": "random real-size" if args.checkpoint is None else str(ckpt),
               "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
               "seconds": "per generated frame", "sizes": {}}
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    lengths = [int(v) for v in args.frames.split(",")]
    if len(lengths) == 1:
        lengths *= len(sizes)
    for (H, W), n in zip(sizes, lengths):
        if n < 2:
            raise SystemExit("--frames: at least 2 per size")
        clip = moving_shapes(n, H, W, step=H / 40)
        geo = pipeline.Geometry.for_size(H, W, cfg)
        runs = {f"official_{v}": [] for v in variants}
        runs["reference"] = []
        frames = {}
        for _ in range(args.repeats):
            for v in variants:
                official.use_xformers(v == "xformers")
                s, frames[f"official_{v}"] = time_official(official, clip)
                runs[f"official_{v}"].append(s)
            s, frames["reference"] = time_reference(reference, clip, geo.latent_tokens, cfg.latent_dim, device)
            runs["reference"].append(s)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"frames_in": n, "generated": n - 1}
        for k, v in runs.items():
            row[f"{k}_s_per_frame"] = min(v)
            row[f"{k}_runs"] = v
        for v in variants:
            row[f"reference_over_official_{v}"] = row["reference_s_per_frame"] / row[f"official_{v}_s_per_frame"]
            row[f"reference_vs_official_{v}_frames"] = compare(frames["reference"], frames[f"official_{v}"])
        summary["sizes"][f"{H}x{W}"] = row
        print(f"{H}x{W}: " + ", ".join(f"{k} {min(v):.4f} s" for k, v in runs.items()), file=sys.stderr, flush=True)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
