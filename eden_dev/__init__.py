"""Developer tooling of this repository, not part of the client: the demo (python -m eden_dev.demo, what ./run.sh demo
runs), a TorchServe launcher (launcher.py) and generated frames and clips (samples.py, clips.py) for the demo, the
tests and the benchmarks. It sits on top of both eden_serve and eden_client (the client imports eden_serve, never
this package); the launcher reads this checkout's config.properties."""
