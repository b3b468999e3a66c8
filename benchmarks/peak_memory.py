"""Run a command and report its wall time and the peak resident memory of its whole process tree.

Ray starts its raylet, GCS and workers as descendants of the driver, so the tree's summed RSS is the
memory the whole local cluster used; the driver's own peak alone would miss the model actors.

    python benchmarks/peak_memory.py -- themis-ray pipeline --config configs/quickstart.yaml
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil


def tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main() -> int:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(root))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    wall = time.perf_counter() - start
    print(json.dumps({"command": " ".join(command), "returncode": child.returncode, "wall_s": round(wall, 1),
                      "peak_tree_rss_gib": round(peak / 2**30, 2)}), file=sys.stderr)
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
