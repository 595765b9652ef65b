"""The host figures of the metrics (servers/common/metrics.py: Host), from /proc files written
here with known numbers, and from this machine's own /proc."""

from __future__ import annotations

from pathlib import Path

from servers.common.metrics import Host

MEMINFO = "MemTotal:       2097152 kB\nMemFree:         100000 kB\nMemAvailable:    524288 kB\n"


def _stat(proc: Path, user: int, idle: int, iowait: int) -> None:
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    (proc / "stat").write_text(f"cpu  {user} 0 0 {idle} {iowait} 0 0 0 0 0\ncpu0 1 2 3\n")


def test_cpu_is_the_busy_share_between_two_samples(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text(MEMINFO)
    host = Host(tmp_path, proc=proc)
    _stat(proc, user=100, idle=300, iowait=0)
    first = host.usage()
    assert first.cpu_percent == 25.0  # since boot: 100 busy of 400
    assert (first.memory_used_mib, first.memory_total_mib) == (1536, 2048)
    # 300 more ticks: 60 busy, 200 idle, 40 waiting on I/O (which is not busy).
    _stat(proc, user=160, idle=500, iowait=40)
    assert host.usage().cpu_percent == 20.0
    # Hardly any time passed (a second dashboard asking at once): the last figure stands.
    _stat(proc, user=161, idle=510, iowait=40)
    assert host.usage().cpu_percent == 20.0
    _stat(proc, user=260, idle=600, iowait=40)  # 200 ticks on from the last sample taken
    assert host.usage().cpu_percent == 50.0


def test_a_host_without_proc_reads_zero_rather_than_failing(tmp_path: Path) -> None:
    usage = Host(tmp_path, proc=tmp_path / "missing").usage()
    assert (usage.cpu_percent, usage.memory_used_mib, usage.memory_total_mib) == (0.0, 0, 0)
    assert 0 < usage.disk_percent <= 100


def test_this_machine(tmp_path: Path) -> None:
    usage = Host(tmp_path).usage()
    assert 0 <= usage.cpu_percent <= 100
    assert 0 < usage.memory_used_mib < usage.memory_total_mib
