"""``bench/round_cpu.py``: a process group's CPU includes the children it has reaped.

The local engine's ClientApps are short-lived forks: by the end of a round they are gone, and their CPU survives
only in their parent's ``cutime``/``cstime``. A count of live processes' ``utime + stime`` alone would leave the
sites' training out of the figure the benchmark is for.
"""

from __future__ import annotations

import subprocess
import sys

from bench.round_cpu import by_group

BURN = 0.3  # CPU seconds each of parent and child spend

CHILD = f"""
import os, sys, time
def burn():
    t = time.process_time()
    while time.process_time() - t < {BURN}:
        pass
pid = os.fork()
if pid == 0:
    burn()
    os._exit(0)
os.waitpid(pid, 0)  # reaped: its CPU is now in this process's cutime
burn()
print("done", flush=True)
sys.stdin.read()  # stay alive until the test has read /proc
"""


def test_group_cpu_counts_reaped_children():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        cpu = by_group({proc.pid: "site"})["site"]
        assert cpu >= 2 * BURN * 0.9, cpu  # its own and the reaped child's (clock ticks: 10 ms)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_systems_benchmarks_keep_the_method_they_were_measured_with(tmp_path):
    """The pilot's default method moved to FedHB (issue 24); the overhead, idle-CPU, SQL, paths, hops and wire
    benchmarks load ``deploy/pilot.toml`` and must still run FedAvg-FT (``bench.common.PILOT_MEASURED``), or a
    rerun would silently compare FedHB's rounds with the FedAvg-FT figures in bench/RESULTS.md."""
    from bench import idle_cpu, linkstate_sql, overhead, paths, wire
    from kumiki.config import load_config

    pilot = load_config(str(overhead.ROOT / "deploy" / "pilot.toml"))
    assert pilot.method.name != "fedavg_ft"  # else this test proves nothing
    cfgs = [overhead.config("pilot", 3, 2, tmp_path, "o"), idle_cpu.config(3, tmp_path, "i"),
            linkstate_sql.config(3, 2, tmp_path, "l"), paths.config("full", tmp_path, "p"),
            wire.config("full", tmp_path, "w", None, "float32", 2)]
    assert [(c.method.name, c.method.ft_epochs) for c in cfgs] == [("fedavg_ft", 1)] * len(cfgs)
