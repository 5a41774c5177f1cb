"""A fake llama-server *binary* for supervisor tests: takes llama-server's arguments, loads
"slowly" and fails the ways the real one does.

Like llama-server (docs/llama-server-facts.md): it listens at once and answers /health with
503 `Loading model` until the model is loaded, then 200; a file that is not a GGUF makes it
print `gguf_init_from_file_impl: invalid magic` on stderr and exit 1 (and a GGUF file with
"never-healthy" in it makes a load that hangs). Chat answers come from
tests/fake_llama.py. Extra flags (all `--fake-*`) script the rest:

  --fake-load-seconds S   time from start to healthy (default 0.2)
  --fake-exit-after S     exit 1 after S seconds (a crash, during or after the load)
  --fake-tokens N, --fake-token-delay S   the chat answer: N tokens, S seconds apart
  --fake-starts FILE      append "PID PORT" to FILE at start (tests count loads and find
                          the processes this way)
  --fake-slot-save-seconds S   each slot save takes S seconds (--slot-save-path enables them)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fake_llama import FakeLlamaServer, Reply  # noqa: E402


async def serve(args: argparse.Namespace) -> int:
    print(f"main: loading model '{args.model}'", file=sys.stderr, flush=True)
    server = FakeLlamaServer(
        Reply(tokens=[f" tok{i}" for i in range(args.fake_tokens)], token_delay=args.fake_token_delay),
        port=args.port,
        keepalive_max=1 << 30,
    )
    server.health_status = 503
    server.slot_save_path = args.slot_save_path
    server.slot_save_seconds = args.fake_slot_save_seconds
    await server.start()
    if args.fake_starts:
        with open(args.fake_starts, "a") as starts:
            starts.write(f"{os.getpid()} {args.port}\n")
    loop = asyncio.get_running_loop()
    if Path(args.model).read_bytes()[:4] != b"GGUF":
        await asyncio.sleep(args.fake_load_seconds / 2)
        print("gguf_init_from_file_impl: invalid magic characters", file=sys.stderr, flush=True)
        print(f"llama_model_load: error loading model: failed to load {args.model}", file=sys.stderr, flush=True)
        return 1

    def loaded() -> None:
        server.health_status = 200
        print("main: model loaded; server is listening", file=sys.stderr, flush=True)

    if b"never-healthy" not in Path(args.model).read_bytes():  # a load that hangs
        loop.call_later(args.fake_load_seconds, loaded)
    if args.fake_exit_after is not None:
        await asyncio.sleep(args.fake_exit_after)
        print("GGML_ASSERT(fake) failed: a scripted crash", file=sys.stderr, flush=True)
        return 1
    await asyncio.Event().wait()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake-load-seconds", type=float, default=0.2)
    parser.add_argument("--fake-exit-after", type=float)
    parser.add_argument("--fake-tokens", type=int, default=3)
    parser.add_argument("--fake-token-delay", type=float, default=0.0)
    parser.add_argument("--fake-starts")
    parser.add_argument("--slot-save-path")
    parser.add_argument("--fake-slot-save-seconds", type=float, default=0.0)
    args, _ignored = parser.parse_known_args()  # llama-server's own flags (-t, -c, --jinja …)
    sys.exit(asyncio.run(serve(args)))


if __name__ == "__main__":
    main()
