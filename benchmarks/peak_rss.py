"""Peak resident memory of a command's whole process tree (the process and all its children), sampled
every 50 ms with psutil; the figure README and BENCHMARKS 3c quote for `python train.py`:

  python benchmarks/peak_rss.py [--json OUT.json] -- python train.py trainer.max_steps=5 \\
      validate_before_training=false +trainer.limit_val_batches=1

Prints one line (exit code, wall time, peak in GiB and GB) after the command's own output, and exits
with the command's exit code. A peak shorter than 50 ms can be missed; GNU time's %M (largest single
process) is the other reading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that ended between the listing and the reading
            pass
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write {command, exit_code, seconds, peak_rss_bytes} here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    start = time.monotonic()
    proc = subprocess.Popen(command)
    process, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, tree_rss(process))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.monotonic() - start
    print(f"exit {proc.returncode}, {seconds:.0f} s, peak RSS of the process tree {peak / 2**30:.2f} GiB "
          f"({peak / 1e9:.2f} GB)", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": command, "exit_code": proc.returncode, "seconds": round(seconds, 1),
                       "peak_rss_bytes": peak}, fh)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
