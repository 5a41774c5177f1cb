"""CaseDesk's benchmark harness; run from the repository root as `python -m bench` (see __main__.py).

Modules, one job each:
  __main__.py          the command line: mode, event loop, results files
  fake.py              `make bench`: direct upstream, floor relay and CaseDesk on the fake llama-server
  floor.py             the bare asyncio byte relay, the yardstick for CPU per token and added TTFT
  load.py              the load generator (raw sockets) and one scenario's figures
  profiling.py         where a CaseDesk's time goes, per request and per token (cProfile)
  profiled_gateway.py  a CaseDesk whose profiler signals switch on and off
  real.py              `make bench-real`: CaseDesk vs llama-server's own /v1/messages
  fleet.py             `make bench-fleet`: prefix vs least-in-flight routing over llama-servers
  fleet_traffic.py     the fleet's conversations (Anthropic SDK, turns, branches)
  swap.py              `make bench-swap`: a prompt cache across a model swap and a CaseDesk restart
  instructions.py      `make bench-instructions`: CaseDesk's user-space instructions (callgrind), per request and token
  slot_pinning.py      id_slot vs llama-server's own slot choice, inside one server
  llama.py             starting real llama-servers on the real model
  procs.py             processes, ports, CPU and memory from /proc, CPU pinning, starting a CaseDesk
  report.py            lines while running, Markdown and chart after
  loop.py              uvloop when installed, chosen before anything runs
"""
