"""llama.cpp's own HTTP server, from the `xllamacpp` wheel, in the foreground.

    python llamacpp_server.py --model FILE.gguf --port 18090 [--alias NAME]

For llmsup's `command` backend (examples/cpu-real-model.yaml): the server
listens at once, answers GET /health with 503 "Loading model" until the model
is loaded, then 200, and serves /v1/models, /v1/completions and
/v1/chat/completions. It runs until SIGTERM or SIGINT, then stops the server
and exits 0. A signal that comes while the model is still loading ends the
process at once (the load runs in llama.cpp's code, where Python cannot act on
signals; there is nothing to clean up yet).

Needs `pip install xllamacpp` in the interpreter that runs it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llamacpp_server.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="a GGUF file")
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--alias", help="the model's name in /v1/models and responses")
    p.add_argument("--ctx", type=int, default=2048, help="context length (tokens)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for generation")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not args.model.is_file():
        print(f"llamacpp_server.py: no GGUF file at {args.model}", file=sys.stderr)
        return 2
    try:
        import xllamacpp  # type: ignore[import-not-found]
    except ImportError:
        print(
            f"llamacpp_server.py: {sys.executable} has no xllamacpp; pip install xllamacpp",
            file=sys.stderr,
        )
        return 2
    params = xllamacpp.CommonParams()
    params.model.path = str(args.model)
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.cpuparams.n_threads = args.threads
    if args.alias:
        params.model_alias = {args.alias}
    # Serves /health (503) at once, and returns once the model is loaded; the
    # HTTP server then runs in threads of its own until the object is deleted.
    server = xllamacpp.Server(params)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"llamacpp_server.py: serving {args.model.name} on {server.listening_address}", flush=True
    )
    stop.wait()
    del server  # stops the HTTP server and frees the model
    print("llamacpp_server.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
