"""CaseDesk benchmark: the direct upstream, a bare relay and CaseDesk side by side, in one run.

    python -m bench            # fake llama-server (make bench)
    python -m bench real       # real llama-server + Gemma 3 270M (make bench-real)
    python -m bench fleet      # prefix vs least_in_flight over real llama-servers (make bench-fleet)
    python -m bench swap       # a prompt cache across a model swap and a restart (make bench-swap; or --swap)
    python -m bench instructions  # CaseDesk's CPU work in instructions, under callgrind (make bench-instructions)
    python -m bench --peer http://127.0.0.1:4000/anthropic   # another gateway too
    python -m bench --checkout before=/path/to/other/checkout  # another CaseDesk version too

Run from the repository root (it imports tests.fake_llama). Each server under test runs in
its own process, the load generator here: a gateway's CPU is read from /proc, so it is its
own. Results go to bench/results/{latest,real,fleet,swap,instructions}.{json,md} (and latest.png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import fake, fleet, instructions, real, swap
from bench.loop import runner
from bench.procs import ROOT, Processes
from bench.report import chart, markdown

RESULTS = ROOT / "bench" / "results"
MODES = {
    "fake": (fake, "latest"),
    "real": (real, "real"),
    "fleet": (fleet, "fleet"),
    "swap": (swap, "swap"),
    "instructions": (instructions, "instructions"),
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode")
    fake.add_arguments(modes.add_parser("fake", help="the fake llama-server (the default)"))
    real.add_arguments(modes.add_parser("real", help="the real llama-server and model, vs its own /v1/messages"))
    fleet.add_arguments(modes.add_parser("fleet", help="prefix vs least_in_flight over several llama-servers"))
    swap.add_arguments(modes.add_parser("swap", help="a prompt cache across a model swap and a CaseDesk restart"))
    instructions.add_arguments(modes.add_parser("instructions", help="CaseDesk's CPU work in instructions (callgrind)"))
    if argv[:1] == ["--swap"]:
        argv = ["swap", *argv[1:]]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["fake", *argv]
    return parser.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    module, name = MODES[args.mode]
    loop_name, run = runner()  # decided here: an ImportError during a run is that run's failure
    result: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {loop_name}",
    }
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result.update(run(module.run(args, procs, Path(tmp))))
    finally:
        procs.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    if args.mode == "fake":
        chart(result, RESULTS / f"{name}.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
