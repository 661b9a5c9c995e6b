"""The peak-memory probe: the CUDA allocator's peak on a GPU, the peak resident set (RSS) on a CPU.

Training, job tracking and the throughput benchmark all measure with these functions. On Linux the CPU peak
is the kernel's VmHWM mark, which `reset_peak_rss` restarts; elsewhere only the lifetime peak (ru_maxrss) exists.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

MB = 2**20


def current_rss_mb() -> float:
    """The process's resident set now (Linux /proc/self/statm)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MB


def lifetime_peak_rss_mb() -> float:
    """The process's peak resident set since it started (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark (VmHWM, by writing 5 to /proc/self/clear_refs); False where that is not
    possible (not Linux, or not allowed), and `peak_rss_mb` then reports the lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """The peak resident set since `reset_peak_rss` (Linux VmHWM), else the process's lifetime peak."""
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return lifetime_peak_rss_mb()


def reset_peak_memory(device: str) -> None:
    """Start a new peak for `peak_memory_mb` (a reused worker must not report an earlier job's peak):
    the CUDA allocator's peak on a GPU, the peak resident set on a CPU."""
    if device == "cuda":
        import torch  # only GPU jobs ask, and they have torch loaded; the CPU probe stays free of it

        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated on a GPU; on a CPU the peak resident set since `reset_peak_memory`."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / MB
    return peak_rss_mb()
