"""A CaseDesk whose profiler is switched by signals, so that a profile holds only what is measured.

SIGUSR1 starts cProfile and touches `STATS.on`; SIGUSR2 stops it and writes STATS (pstats
format). Start-up, imports and warm-up stay out of the figures.

    python -m bench.profiled_gateway STATS serve --config FILE
"""

from __future__ import annotations

import cProfile
import signal
import sys
from pathlib import Path
from types import FrameType


def main() -> None:
    stats = Path(sys.argv[1])
    profile = cProfile.Profile()

    def start(_signum: int, _frame: FrameType | None) -> None:
        profile.enable()
        stats.with_suffix(".on").touch()

    def stop(_signum: int, _frame: FrameType | None) -> None:
        profile.disable()
        profile.dump_stats(str(stats))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from casedesk import cli

    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
