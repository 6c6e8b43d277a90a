"""Peak resident memory of a command's whole process tree (the process and all its children), sampled
every 50 ms with psutil; the figure README and BENCHMARKS 3c quote for `python train.py`:

  python benchmarks/peak_rss.py [--json OUT.json] -- python train.py trainer.max_steps=5 \\
      validate_before_training=false +trainer.limit_val_batches=1

Prints one line after the command's own output, and exits with the command's exit code: exit code, wall
time, the sampled peak of the tree, and the kernel's exact peak of the largest single process
(getrusage's ru_maxrss, what GNU time's %M reports). The sampler can miss a peak shorter than 50 ms; the
kernel's figure cannot, but it does not add up processes (and it can start from this script's own
15 MB, which a child holds between fork and exec). For a single-process run (`python train.py`,
data.num_workers=0) the larger of the two is the peak.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    parser.add_argument("--json", help="also write {command, exit_code, seconds, peak_rss_bytes, "
                                       "largest_process_peak_rss_bytes} here")
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
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    print(f"exit {proc.returncode}, {seconds:.0f} s, peak RSS of the process tree {peak / 2**30:.2f} GiB "
          f"({peak / 1e9:.2f} GB) sampled; largest single process {largest / 2**30:.2f} GiB "
          f"({largest / 1e9:.2f} GB) exact", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": command, "exit_code": proc.returncode, "seconds": round(seconds, 1),
                       "peak_rss_bytes": peak,
                       "largest_process_peak_rss_bytes": largest}, fh)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
