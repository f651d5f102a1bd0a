"""Peak resident memory of this process.

getrusage's ru_maxrss is not enough: Linux carries the pre-exec high-water mark of the process that
forked us into it (a child started from a 16 GB parent reports 16 GB), so the figure is read from
/proc/self/status (VmHWM, this address space only) where it exists.
"""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
