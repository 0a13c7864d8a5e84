"""What Linux's ``/proc`` says about a process (memory, CPU time) and about the CPU.

``pid`` is a process id or ``"self"``. Readers of a process return ``{}`` / ``None`` when the
process is gone (or ``/proc`` is absent), except :func:`rss_bytes`, which raises.
"""
from __future__ import annotations

import os
from pathlib import Path

#: the memory fields of ``/proc/PID/status`` that :func:`memory` reads: resident now, resident peak
MEMORY_FIELDS = ("VmRSS", "VmHWM")


def memory(pid: int | str = "self", fields: tuple[str, ...] = MEMORY_FIELDS) -> dict[str, int]:
    """``fields`` of ``/proc/PID/status``, in bytes (``{}`` if the process is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0]) * 1024   # kB
    except (OSError, ValueError, IndexError):
        return {}
    return out


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size (``VmRSS``) of a process, in bytes; raises ``RuntimeError`` if unknown."""
    rss = memory(pid, ("VmRSS",)).get("VmRSS")
    if rss is None:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status")
    return rss


def cpu_seconds(pid: int | str = "self") -> float | None:
    """User + system CPU time of a process so far (``/proc/PID/stat`` utime + stime), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The first CPU's ``model name`` from ``/proc/cpuinfo`` (``None`` where there is none)."""
    return _cpuinfo_field("model name")


def cpu_flags() -> frozenset[str]:
    """The first CPU's ``flags`` from ``/proc/cpuinfo`` (empty where there are none)."""
    return frozenset((_cpuinfo_field("flags") or "").split())
