#!/usr/bin/env python3
"""Build eden_encoder.mar and eden_ditdec.mar from split weights (eden_serve/archives.py says what goes in them).

    python archive_scripts/build_archives.py --weights weights/ --model-store model_store/ \
        [--gpus N] [--profile all|spread|split] [--side both|encoder|ditdec] [--workers-per-gpu 2] [--kernels ...]
"""
try:
    from eden_serve.archives import *  # noqa: F401,F403 - the names tests and benchmarks import from here
    from eden_serve.archives import main
except ImportError:  # run from a checkout without the project installed
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from eden_serve.archives import *  # noqa: F401,F403
    from eden_serve.archives import main

if __name__ == "__main__":
    main()
