"""Run the benchmarks: one command, one table per benchmark, results under benchmarks/results/.

    python benchmarks/run.py                      # everything (make bench)
    python benchmarks/run.py --only metrics       # one (or several: --only metrics,train_step)
    python benchmarks/run.py --quick              # small sizes: a smoke test, timings meaningless
    python benchmarks/run.py --update-md BENCHMARKS.md   # also rewrite that file's generated sections

A benchmark is a module beside this file named `bench_<name>.py` (or `gpu_throughput.py`) that exposes
`run(quick: bool = False) -> list[dict]`: one dict per table row, every row compared with a baseline
measured in the same run. Optional module attributes: `TITLE` (a heading) and the module docstring
(the method, printed under the heading in the markdown).

Writes, for each benchmark, `results/<name>.json` (rows + machine + command + date) and
`results/<name>.md` (its markdown section), and `results/BENCHMARKS.generated.md` with all of
them; `--update-md FILE` replaces, in FILE, the text between `<!-- bench:<name>:begin -->` and
`<!-- bench:<name>:end -->` (and `<!-- bench:machine:begin/end -->`) with the new sections, leaving
the rest of FILE (targets, commentary) alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXTRA = ("gpu_throughput",)  # benchmark modules not named bench_*.py


def discover() -> dict[str, Path]:
    """name -> file, in a stable order: bench_*.py sorted, then the extras that exist."""
    found = {p.stem[len("bench_"):]: p for p in sorted(HERE.glob("bench_*.py"))}
    for name in EXTRA:
        path = HERE / f"{name}.py"
        if path.exists():
            found[name] = path
    return found


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))  # a benchmark may import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    return module


def machine() -> dict:
    """What the numbers were measured on (best effort, never fails)."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["logical cores"] = os.cpu_count()
    if hasattr(os, "sched_getaffinity"):
        info["usable cores"] = len(os.sched_getaffinity(0))
    try:
        import psutil

        info["memory GiB"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpu"] = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        else:
            info["gpu"] = "none"
    except Exception:
        pass
    for package in ("transformers", "torchmetrics", "lightning"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            pass
    return info


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:  # nan
            return "nan"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1e5 or mag < 1e-3:
            return f"{value:.2e}"
        if mag >= 100:
            return f"{value:,.0f}" if mag >= 1000 else f"{value:.1f}"
        return f"{value:.4g}" if mag < 1 else f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict]) -> str:
    """Markdown table over the union of the rows' keys (in first-seen order)."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(fmt(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def section(name: str, result: dict) -> str:
    """The markdown for one benchmark, wrapped in its regeneration markers."""
    lines = [f"<!-- bench:{name}:begin -->", f"### {result['title']}", ""]
    lines += [f"Command: `{result['command']}`  ", f"Date: {result['date']} (UTC), "
              f"{result['elapsed_s']:.0f} s" + (", quick sizes (smoke test)" if result["quick"] else "") + "  "]
    avg = result.get("load_average") or {}
    if avg.get("start"):
        lines += [f"Load average (1/5/15 min, {os.cpu_count()} cores): {avg['start']} at start, {avg['end']} at end"]
    if result.get("error"):
        lines += ["", f"**Failed:** `{result['error']}`"]
    lines += ["", table(result["rows"]), "", f"<!-- bench:{name}:end -->"]
    return "\n".join(lines)


def machine_section(info: dict, command: str, date: str) -> str:
    lines = ["<!-- bench:machine:begin -->", f"Command: `{command}`  ", f"Date: {date} (UTC)  ", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "<!-- bench:machine:end -->"]
    return "\n".join(lines)


def update_markdown(path: Path, blocks: dict[str, str]) -> list[str]:
    """Replace each `<!-- bench:NAME:begin -->...<!-- bench:NAME:end -->` in path; return the names missing."""
    text = path.read_text() if path.exists() else ""
    missing = []
    for name, block in blocks.items():
        pattern = re.compile(rf"<!-- bench:{re.escape(name)}:begin -->.*?<!-- bench:{re.escape(name)}:end -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            missing.append(name)
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return missing


def load_average() -> str | None:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_one(name: str, path: Path, quick: bool, command: str, date: str) -> dict:
    module = None
    load_before = load_average()
    start = time.perf_counter()
    rows, error = [], None
    try:
        module = load(name, path)
        rows = list(module.run(quick=quick))
    except Exception as err:  # report and carry on with the other benchmarks
        error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        traceback.print_exc()
    title = getattr(module, "TITLE", None) or name
    return {
        "name": name, "title": title, "command": command, "date": date, "quick": quick,
        "elapsed_s": time.perf_counter() - start, "error": error, "rows": rows,
        "load_average": {"start": load_before, "end": load_average()},
        "method": (module.__doc__ or "").strip() if module else "",
    }


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(description="Run the benchmarks in benchmarks/ and write their results.")
    parser.add_argument("--only", action="append", default=[],
                        help=f"comma-separated names to run (repeatable); available: {', '.join(available)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, timings meaningless")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")
    parser.add_argument("--update-md", type=Path, metavar="FILE",
                        help="rewrite the generated sections (between bench markers) of FILE, e.g. BENCHMARKS.md")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{name}\t{path.relative_to(ROOT)}" for name, path in available.items()))
        return 0
    selected = [n.strip() for item in args.only for n in item.split(",") if n.strip()] or list(available)
    unknown = [n for n in selected if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    info = machine()
    base_cmd = "python benchmarks/run.py" + (" --quick" if args.quick else "")
    print(f"# benchmarks ({date} UTC)")
    print("\n".join(f"  {k}: {v}" for k, v in info.items()), flush=True)

    results, failed = {}, []
    for name in selected:
        command = base_cmd + f" --only {name}"
        print(f"\n## {name}: running ...", flush=True)
        result = run_one(name, available[name], args.quick, command, date)
        result["machine"] = info
        results[name] = result
        if result["error"]:
            failed.append(name)
        print(f"\n{result['title']}  ({result['elapsed_s']:.0f} s)" + (f"  FAILED: {result['error']}" if result["error"] else ""))
        print(table(result["rows"]), flush=True)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (args.out / f"{name}.md").write_text(section(name, result) + "\n")

    full_cmd = base_cmd + ("" if set(selected) == set(available) else f" --only {','.join(selected)}")
    blocks = {"machine": machine_section(info, full_cmd, date)}
    blocks.update({name: section(name, result) for name, result in results.items()})
    combined = ["# Benchmark results (generated by benchmarks/run.py)", ""] + [b + "\n" for b in blocks.values()]
    combined_path = args.out / "BENCHMARKS.generated.md"
    combined_path.write_text("\n".join(combined))
    print(f"\nresults: {args.out}/<name>.json, <name>.md; combined markdown: {combined_path}")
    if args.update_md:
        missing = update_markdown(args.update_md, blocks)
        print(f"updated {args.update_md}" + (f" (appended new sections: {', '.join(missing)})" if missing else ""))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
