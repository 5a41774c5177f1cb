"""The benchmark's results as text: one line per scenario while it runs, Markdown and a chart after.

The Markdown is what the README's performance and fleet sections quote; bench/results/ keeps
each mode's last run (JSON, Markdown, and for `make bench` a PNG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def fmt_fleet(row: dict[str, Any]) -> str:
    return (
        f"{row['variant']:>12} {row['balance']:>15}: later-turn cached {row['later_cached_share'] * 100:5.1f} % "
        f"TTFT first p50/p99 {row['ttft_first_p50_ms']:.0f}/{row['ttft_first_p99_ms']:.0f} ms, "
        f"later p50/p99 {row['ttft_later_p50_ms']:.0f}/{row['ttft_later_p99_ms']:.0f} ms, "
        f"{row['tokens_per_s']:.1f} tok/s, requests per upstream {row['requests_per_upstream']} "
        f"(max/mean {row['max_over_mean_requests']:.2f}), work {row['work_per_upstream']} "
        f"(max/mean {row['max_over_mean_work']:.2f})"
    )


def fmt_row(row: dict[str, Any]) -> str:
    cpu = f"{row['cpu_us_per_token']:.2f}" if row["cpu_us_per_token"] is not None else "-"
    return (
        f"{row['target']:>9} c={row['concurrency']:<4} tok/s={row['tokens_per_s']:>9.0f} cpu µs/tok={cpu:>6} "
        f"ttft p50={row['ttft_p50_ms']:.2f}ms p99={row['ttft_p99_ms']:.2f}ms "
        f"gap p50={row['gap_p50_ms'] or 0:.3f}ms p99={row['gap_p99_ms'] or 0:.3f}ms"
    )


def floor_section(result: dict[str, Any]) -> list[str]:
    """Each relay against the direct upstream (added TTFT) and against the floor (CPU ÷ the floor's)."""
    by = {(r["target"], r["concurrency"]): r for r in result["rows"]}
    relays = ["floor", *result.get("gateways", ["casedesk"])]
    lines = [
        "",
        "Against the direct upstream (added TTFT) and the bare relay (CPU per token ÷ the floor's), same run:",
        "",
        "| streams at once | target | CPU µs/token | ÷ floor | added TTFT p50 ms | added TTFT p99 ms"
        " | tokens/s ÷ direct |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted({r["concurrency"] for r in result["rows"]}):
        direct, floor = by.get(("direct", c)), by.get(("floor", c))
        floor_cpu = floor["cpu_us_per_token"] if floor else None
        for name in relays:
            row = by.get((name, c))
            if row is None or direct is None:
                continue
            cpu = row["cpu_us_per_token"]
            cpu_text = f"{cpu:.2f}" if cpu is not None else "–"
            ratio = f"{cpu / floor_cpu:.2f}" if cpu is not None and floor_cpu else "–"
            added_p50 = row["ttft_p50_ms"] - direct["ttft_p50_ms"]
            added_p99 = row["ttft_p99_ms"] - direct["ttft_p99_ms"]
            speed = row["tokens_per_s"] / direct["tokens_per_s"]
            lines.append(f"| {c} | {name} | {cpu_text} | {ratio} | {added_p50:+.2f} | {added_p99:+.2f} | {speed:.2f} |")
    return lines


def fake_section(result: dict[str, Any]) -> list[str]:
    """`make bench`: every target's row, the comparisons, memory and connections."""
    lines: list[str] = []
    if result.get("layout"):
        lines += [f"Processes: {result['layout']}.", ""]
    lines += [
        "| target | streams at once | tokens/s | gateway CPU µs/token | TTFT p50 ms | TTFT p99 ms"
        " | gap p50 ms | gap p99 ms | RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cpu = f"{r['cpu_us_per_token']:.2f}" if r["cpu_us_per_token"] is not None else "–"
        rss = f"{r['rss_mb']:.0f}" if r["rss_mb"] is not None else "–"
        lines.append(
            f"| {r['target']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | {cpu} | {r['ttft_p50_ms']:.2f} | "
            f"{r['ttft_p99_ms']:.2f} | {(r['gap_p50_ms'] or 0):.3f} | {(r['gap_p99_ms'] or 0):.3f} | {rss} |"
        )
    lines += floor_section(result)
    if result.get("per_request"):
        by = {r["target"]: r["cpu_us_per_request"] for r in result["per_request"]}
        floor = by.get("floor")
        lines += [
            "",
            "CPU per request (one-token answers, one at a time): "
            + ", ".join(
                f"{name} {us:.0f} µs" + (f" ({us / floor:.2f}× the floor)" if floor and name != "floor" else "")
                for name, us in by.items()
            )
            + ".",
        ]
    if result.get("slow_streams"):
        s = result["slow_streams"]
        lines += [
            "",
            f"{s['streams']} concurrent slow streams (20 ms between tokens): {s['completed']} completed, "
            f"gateway RSS {s['rss_before_mb']:.0f} MB before, {s['rss_peak_mb']:.0f} MB at the peak.",
        ]
    if result.get("upstream_connections"):
        opened = ", ".join(
            f"{n['connections']} at {k} (TTFT p50 {n['ttft_p50_ms']:.2f} ms)"
            for k, n in result["upstream_connections"].items()
        )
        lines += ["", f"Upstream connections CaseDesk opened for 200 streamed 8-token requests: {opened}."]
    return lines


def real_section(result: dict[str, Any]) -> list[str]:
    """`make bench-real`: CaseDesk and llama-server's own /v1/messages."""
    lines: list[str] = []
    lines += [
        "",
        f"Real llama-server (Gemma 3 270M, {result['threads']} thread(s)), streamed, interleaved runs:",
        "",
        "| target | runs | tokens | tokens/s (median) | tokens/s (middle half of the runs) | TTFT ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in result["real"].items():
        low, high = s.get("tokens_per_s_quartiles", (s["tokens_per_s_median"],) * 2)
        lines.append(
            f"| {name} | {s['runs']} | {s['tokens']} | {s['tokens_per_s_median']:.1f} | {low:.1f}–{high:.1f} "
            f"| {s['ttft_ms_median']:.1f} |"
        )
    lines += ["", f"CaseDesk tokens/s ÷ llama-server's own /v1/messages: **{result['ratio']:.4f}**"]
    pairs = result.get("ttft_pairs")
    if pairs:
        low, high = pairs["added_ms_quartiles"]
        lines += [
            "",
            f"Time to first token in {pairs['pairs']} pairs of 3-token requests (one to each, who goes first "
            f"alternating): llama-server's own {pairs['own_ms_median']:.2f} ms, CaseDesk "
            f"{pairs['casedesk_ms_median']:.2f} ms (medians); CaseDesk's added time in a pair "
            f"**{pairs['added_ms_median']:+.2f} ms** (median; middle half {low:+.2f} to {high:+.2f}).",
        ]
    return lines


def fleet_section(result: dict[str, Any]) -> list[str]:
    """`make bench-fleet`: the pooled runs, each run, and slot pinning if measured."""
    lines: list[str] = []
    setup = result["fleet_setup"]
    lines += [
        "",
        f"Fleet: {setup['servers']} llama-servers × {setup['slots']} slots (Gemma 3 270M, 1 thread each, "
        f"`{setup.get('llama_args', '')}`), "
        f"{setup['conversations']} conversations × {setup['turns']} turns, {setup['in_flight']} in flight, "
        f"max_tokens {setup['max_tokens']}; skewed: one hot conversation sending {setup['hot_branches']} "
        "parallel requests after its 2 turns, among cold ones of 2 turns.",
    ]
    if result.get("fleet_pooled"):
        lines += [
            "",
            f"Over {setup.get('repeat', 1)} runs of each, interleaved (TTFT percentiles of the pooled turns; "
            "the spread of the worst run):",
            "",
            "| variant | balance | later-turn prompt tokens cached (worst run) | later turns less than half "
            "cached | TTFT first p50 ms | TTFT later p50 / p99 ms | tokens/s | busiest upstream / mean: "
            "requests, work (worst run) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["fleet_pooled"]:
            lines.append(
                f"| {r['variant']} | {r['balance']} | {r['later_cached_share'] * 100:.1f} % "
                f"({r['later_cached_share_min'] * 100:.1f} %) | {r['later_misses']} of {r['later_turns']} | "
                f"{r['ttft_first_p50_ms']:.0f} | {r['ttft_later_p50_ms']:.0f} / {r['ttft_later_p99_ms']:.0f} | "
                f"{r['tokens_per_s']:.1f} | {r['max_over_mean_requests_worst']:.2f}, "
                f"{r['max_over_mean_work_worst']:.2f} |"
            )
    lines += [
        "",
        "Each run:",
        "",
        "| variant | balance | later-turn prompt tokens cached | later turns less than half cached "
        "| TTFT first p50 / p99 ms | TTFT later p50 / p99 ms "
        "| tokens/s | requests per upstream (max/mean) | work per upstream (max/mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["fleet"]:
        lines.append(
            f"| {r['variant']}{' #' + str(r['run'] + 1) if 'run' in r else ''} | {r['balance']} | "
            f"{r['later_cached_share'] * 100:.1f} % | "
            f"{r.get('later_misses', '–')} | {r['ttft_first_p50_ms']:.0f} / {r['ttft_first_p99_ms']:.0f} | "
            f"{r['ttft_later_p50_ms']:.0f} / {r['ttft_later_p99_ms']:.0f} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_upstream']} ({r['max_over_mean_requests']:.2f}) | "
            f"{r['work_per_upstream']} ({r['max_over_mean_work']:.2f}) |"
        )
    if result.get("slot_pinning"):
        lines += [
            "",
            "Inside one llama-server (its share of the same traffic), slot pinning vs its own choice:",
            "",
            "| slot choice | later-turn prompt tokens cached | later-turn prefill p50 ms | wall s |",
            "|---|---|---|---|",
        ]
        for r in result["slot_pinning"]:
            lines.append(
                f"| {r['mode']} | {r['later_cached_share'] * 100:.1f} % | {r['later_prompt_ms_p50']:.0f} | "
                f"{r['wall_s']:.0f} |"
            )
    return lines


def swap_section(result: dict[str, Any]) -> list[str]:
    """`make bench-swap`: the turns on tag a across a swap and a restart, and the slot files' times."""
    lines = [
        "",
        "A conversation's prompt cache across a model swap and a CaseDesk restart (Gemma 3 270M,"
        " `max_loaded_models = 1`; TTFT from tag a loaded):",
        "",
        "| turn | prompt tokens | cached tokens | TTFT s |",
        "|---|---|---|---|",
    ]
    for r in result["swap"]:
        lines.append(f"| {r['turn']} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_s']:.2f} |")
    saves = ", ".join(f"{s['tokens']} tokens ({s['bytes'] / 1e6:.1f} MB) in {s['ms']} ms" for s in result["saves"])
    restores = ", ".join(f"{r['tokens']} tokens in {r['ms']} ms" for r in result["restores"])
    lines += ["", f"Slot saves: {saves or 'none'}. Restores: {restores or 'none'}."]
    return lines


def instructions_section(result: dict[str, Any]) -> list[str]:
    """Instructions per request and per token of each CaseDesk, and each against the first."""
    counted = result["instructions"]
    first = next(iter(counted))
    lines = [
        "Instructions CaseDesk ran in user space (callgrind), per request and per token; the last column",
        f"against {first}:",
        "",
        "| load | CaseDesk | k instructions / request | instructions / token | ÷ " + first + " |",
        "|---|---|---|---|---|",
    ]
    for shape in counted[first]:
        for name, counts in counted.items():
            row = counts[shape]
            ratio = row["per_request"] / counted[first][shape]["per_request"]
            per_token = f"{row['per_token']:,.0f}" if row["per_token"] is not None else "–"
            lines.append(f"| {shape} | {name} | {row['per_request'] / 1e3:,.0f} | {per_token} | {ratio:.3f} |")
    return lines


def profile_section(result: dict[str, Any]) -> list[str]:
    """The cProfile tables of `make bench`."""
    lines: list[str] = []
    lines += [
        "",
        "Where the gateway's time goes (cProfile, µs of own time per request and per token):",
        "",
        "```",
        result["profile"].rstrip(),
        "```",
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# CaseDesk benchmark ({result['when']}, {result['machine']})", ""]
    if "rows" in result:
        lines += fake_section(result)
    if "real" in result:
        lines += real_section(result)
    if "fleet" in result:
        lines += fleet_section(result)
    if "swap" in result:
        lines += swap_section(result)
    if "instructions" in result:
        lines += instructions_section(result)
    if result.get("profile"):
        lines += profile_section(result)
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is not installed (the `bench` extra)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    targets = list(dict.fromkeys(r["target"] for r in rows))  # in the run's order
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        cs = [r["concurrency"] for r in mine]
        axes[0].plot(cs, [r["tokens_per_s"] for r in mine], marker="o", label=target)
        axes[1].plot(cs, [r["ttft_p50_ms"] for r in mine], marker="o", label=f"{target} p50")
        axes[1].plot(cs, [r["ttft_p99_ms"] for r in mine], marker="x", linestyle="--", label=f"{target} p99")
        axes[2].plot(cs, [r["gap_p99_ms"] or 0 for r in mine], marker="o", label=f"{target} p99")
    for ax, title in zip(axes, ["tokens/s", "time to first token (ms)", "inter-token gap p99 (ms)"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"CaseDesk vs direct upstream (fake llama-server, {result['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
