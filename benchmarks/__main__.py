"""python -m benchmarks [--quick] [--only NAME ...] [--out FILE]

Runs the benchmark suite and writes results.json and a Markdown table (RESULTS.md,
beside it). Benchmarks are not tests: nothing here fails on a slow figure. A figure
that misses its target is marked in the table; the exit status is non-zero only when
a benchmark could not run at all.

``--only`` runs some of them and keeps the others' last results in the file, so one
benchmark can be re-measured after a change without the whole suite. ``baseline.json``
(the suite's figures before the work of issue 5) fills the table's "before" column.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import ROOT, Context, Figure

BENCHMARKS = ("training", "scoring", "rerun", "incremental", "scale", "orchestration", "quality", "table_quality",
              "surface_quality", "feature_throughput", "table_scale",
              "gpu")
HERE = Path(__file__).resolve().parent


def machine() -> dict:
    import psutil

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git: the record says so instead of the run failing
            return ""

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return info


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    magnitude = abs(value)
    text = f"{value:.3f}" if magnitude < 10 else f"{value:.1f}" if magnitude < 1000 else f"{value:,.0f}"
    return text


def markdown(results: dict, baseline: dict | None) -> str:
    before = {}
    for bench in (baseline or {}).get("benchmarks", {}).values():
        for fig in bench.get("figures", []):
            before[fig["key"]] = fig
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Made by `make bench` (`python -m benchmarks`) on {m.get('cpu')} ({m.get('cores')} cores, "
        f"{m.get('memory_gb')} GB), torch {m.get('torch')} with {m.get('torch_threads')} threads, "
        f"GPU: {m.get('cuda') or 'none'}; commit {m.get('commit')}{' (dirty)' if m.get('dirty') else ''}"
        + (" — QUICK run, sizes too small to quote" if results.get("quick") else "") + ".",
        "Each figure is the median of its repetitions, with the min–max range; a ratio is taken between "
        "repetitions run side by side. *before* is the same figure in `baseline.json`, measured before the "
        "performance work. What each benchmark does: benchmarks/README.md.",
        "",
    ]
    if (baseline or {}).get("about"):
        lines += [f"*before*: {baseline['about']}", ""]
    for name, bench in results["benchmarks"].items():
        lines += [f"## {bench.get('title', name)}", ""]
        if bench.get("error"):
            lines += [f"**Could not run:** {bench['error']}", ""]
            continue
        lines += ["| figure | median | range | unit | before | target | met |", "|---|---|---|---|---|---|---|"]
        for fig in bench["figures"]:
            previous = before.get(fig["key"], {}).get("median")
            spread = "–" if fig["min"] is None else f"{_fmt(fig['min'])}–{_fmt(fig['max'])}"
            met = "–" if fig["met"] is None else ("yes" if fig["met"] else "**NO**")
            label = fig["label"] + (f" ({fig['note']})" if fig.get("note") else "")
            lines.append(f"| {label} | {_fmt(fig['median'])} | {spread} | {fig['unit']} | {_fmt(previous)} | "
                         f"{fig['target'] or ''} | {met} |")
        if bench.get("notes"):
            lines += ["", bench["notes"]]
        lines += ["", f"_{bench.get('seconds', 0):.0f} s, {bench.get('finished', '')}_", ""]
    return "\n".join(lines) + "\n"


# RESULTS.md from this line on is written by hand (figures measured outside the suite, and
# earlier figures the docs quote), so a run of the suite rewrites the tables and keeps it
HAND_WRITTEN = "<!-- written by hand below: make bench keeps it -->"


def write_markdown(path: Path, tables: str) -> None:
    kept = path.read_text().partition(HAND_WRITTEN) if path.is_file() else ("", "", "")
    path.write_text(tables + ("\n" + HAND_WRITTEN + kept[2] if kept[1] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: checks that it all runs")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None, metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 5; quick: 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json", help="results file (RESULTS.md beside it)")
    parser.add_argument("--baseline", type=Path, default=HERE / "baseline.json", help="the 'before' figures")
    parser.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder for a look")
    args = parser.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    out: Path = args.out
    results = json.loads(out.read_text()) if args.only and out.is_file() else {"benchmarks": {}}
    if results.get("quick", args.quick) != args.quick:
        results = {"benchmarks": {}}  # never mix a quick run's figures with real ones
    results.update(machine=machine(), quick=args.quick)
    repeats = args.repeats or (1 if args.quick else 5)
    scratch = Path(tempfile.mkdtemp(prefix="anomaly-bench-"))
    failed = []
    try:
        for name in names:
            module = importlib.import_module(f"benchmarks.{name}")
            print(f"\n=== {name}: {module.TITLE}", flush=True)
            started = time.perf_counter()
            record: dict = {"title": module.TITLE}
            try:
                figures: list[Figure] = module.run(Context(quick=args.quick, repeats=repeats,
                                                           scratch=scratch / name))
                record["figures"] = [f.as_dict() for f in figures]
                record["notes"] = getattr(module, "NOTES", "")
                for f in figures:
                    verdict = "" if f.met is None else ("  target met" if f.met else "  TARGET MISSED")
                    print(f"  {f.label}: {_fmt(f.median)} {f.unit} (range {_fmt(min(f.samples) if f.samples else None)}"
                          f"–{_fmt(max(f.samples) if f.samples else None)}) {f.target}{verdict}", flush=True)
            except Exception as error:  # one broken benchmark must not cost the others' figures
                traceback.print_exc()
                record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
                failed.append(name)
            record.update(seconds=round(time.perf_counter() - started, 1),
                          finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            results["benchmarks"][name] = record
            ordered = {n: results["benchmarks"][n] for n in BENCHMARKS if n in results["benchmarks"]}
            results["benchmarks"] = ordered
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")  # after each one: a crash keeps the rest
            baseline = json.loads(args.baseline.read_text()) if args.baseline.is_file() and \
                args.baseline.resolve() != out.resolve() else None
            write_markdown(out.with_name("RESULTS.md" if out.stem == "results" else out.stem + ".md"),
                           markdown(results, baseline))
    finally:
        if args.keep_scratch:
            print(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nwrote {out}")
    if failed:
        print(f"error: could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
