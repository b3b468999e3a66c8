"""Run a command and report its wall time and the peak memory of its whole process tree.

Ray starts its raylet, GCS and workers as descendants of the driver, so the tree's memory is what
the whole local cluster used; the driver's own peak alone would miss the model actors. Summed RSS
counts shared pages (torch's libraries, the object store) once per process, so the proportional set
size (PSS, shared pages split between their users) is the honest total; both are reported, with the
machine's used-memory rise as a cross-check.

    python benchmarks/peak_memory.py -- themis-ray pipeline --config configs/quickstart.yaml
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS, summed PSS) of `root` and its descendants."""
    rss = pss = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def used_memory() -> int:
    vm = psutil.virtual_memory()
    return vm.total - vm.available


def main() -> int:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    baseline = used_memory()
    start = time.perf_counter()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    peak_rss = peak_pss = peak_used = 0
    while child.poll() is None:
        try:
            rss, pss = tree_memory(root)
        except psutil.NoSuchProcess:
            break
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        peak_used = max(peak_used, used_memory() - baseline)
        time.sleep(1.0)
    wall = time.perf_counter() - start
    gib = 2**30
    print(json.dumps({"command": " ".join(command), "returncode": child.returncode, "wall_s": round(wall, 1),
                      "peak_tree_pss_gib": round(peak_pss / gib, 2), "peak_tree_rss_gib": round(peak_rss / gib, 2),
                      "peak_machine_used_rise_gib": round(peak_used / gib, 2)}), file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
