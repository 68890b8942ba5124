"""What the benchmarks share: a scratch directory and process group, an emptied Redis,
percentiles, a process watcher, Redis INFO deltas, tables.

Imported as `benchlib` by the scripts in this directory (run as `python bench/x.py`,
which puts `bench/` first on `sys.path`).

>>> percentile([1.0, 2.0, 3.0, 4.0], 50)
2.5
>>> table(["a", "b"], [[1, "x"]])
'| a | b |\\n|---|---|\\n| 1 | x |'
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from swarm_workers.localfleet import ProcessGroup, wait_until

__all__ = [
    "ProcWatch",
    "RedisCounters",
    "empty",
    "machine",
    "percentile",
    "proc_cpu_s",
    "proc_status",
    "scratch",
    "table",
    "write_json",
]


@contextmanager
def scratch() -> Iterator[tuple[Path, ProcessGroup]]:
    """A temporary directory and a process group logging into it; every process the
    group started is stopped, and the directory removed, on the way out."""
    with tempfile.TemporaryDirectory() as tmp, ProcessGroup(log_dir=Path(tmp)) as group:
        yield Path(tmp), group


def empty(client: redis.Redis) -> None:
    """FLUSHDB, then wait until the server reports it empty: one round's keys gone
    before the next round starts."""
    client.flushdb()
    wait_until(lambda: client.dbsize() == 0, 5, "an empty Redis")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (as numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, as bench/README.md records them."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where and when: CPUs, load averages at the time of the call, Python."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }


def write_json(path: Path | None, data: Mapping[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str))
        print(f"wrote {path}")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (KiB), VmHWM (KiB, the kernel's peak RSS) and Threads of a live process."""
    wanted = {"VmRSS", "VmHWM", "Threads"}
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in wanted:
                found[name] = int(value.split()[0])
    return found


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (its threads included)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ProcWatch:
    """Samples a process's RSS and thread count every `interval_s` in a thread.

    Usage::

        with ProcWatch(os.getpid()) as watch:
            work()
        watch.peak_rss_mb, watch.peak_threads
    """

    pid: int
    interval_s: float = 0.25
    peak_rss_kb: int = 0
    peak_hwm_kb: int = 0
    peak_threads: int = 0
    samples: int = 0
    cpu_s: float = 0.0  # used while watched
    _cpu_start: float = 0.0
    _cpu_last: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        try:
            status = proc_status(self.pid)
        except OSError:
            return
        try:
            self._cpu_last = proc_cpu_s(self.pid)
        except OSError:
            return
        self.cpu_s = self._cpu_last - self._cpu_start
        self.samples += 1
        self.peak_rss_kb = max(self.peak_rss_kb, status.get("VmRSS", 0))
        self.peak_hwm_kb = max(self.peak_hwm_kb, status.get("VmHWM", 0))
        self.peak_threads = max(self.peak_threads, status.get("Threads", 0))

    @property
    def peak_rss_mb(self) -> float:
        return max(self.peak_rss_kb, self.peak_hwm_kb) / 1024

    def __enter__(self) -> ProcWatch:
        self._cpu_start = proc_cpu_s(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


@dataclass
class RedisCounters:
    """Redis' own counters at one moment: per-command calls and µs, bytes in and out,
    CPU seconds, keys, memory. `b - a` gives the delta over a run."""

    at: float
    calls: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    cpu_s: float
    keys: int
    used_memory: int

    @classmethod
    def read(cls, client: redis.Redis) -> RedisCounters:
        stats = client.info("commandstats")
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        for name, value in stats.items():
            command = name.removeprefix("cmdstat_")
            calls[command] = int(value["calls"])
            usec[command] = int(value["usec"])
        info = client.info()
        return cls(
            at=time.monotonic(),
            calls=calls,
            usec=usec,
            net_in=int(info["total_net_input_bytes"]),
            net_out=int(info["total_net_output_bytes"]),
            cpu_s=float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
            keys=int(client.dbsize()),
            used_memory=int(info["used_memory"]),
        )

    def __sub__(self, other: RedisCounters) -> RedisCounters:
        names = set(self.calls) | set(other.calls)
        return RedisCounters(
            at=self.at - other.at,
            calls={n: self.calls.get(n, 0) - other.calls.get(n, 0) for n in names},
            usec={n: self.usec.get(n, 0) - other.usec.get(n, 0) for n in names},
            net_in=self.net_in - other.net_in,
            net_out=self.net_out - other.net_out,
            cpu_s=self.cpu_s - other.cpu_s,
            keys=self.keys - other.keys,
            used_memory=self.used_memory - other.used_memory,
        )

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_usec(self) -> int:
        return sum(self.usec.values())
