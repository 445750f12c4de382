"""Keeping pace with the vendor (issue 9): the pipeline beside a plain loop, as processes.

    python bench/pace.py all            # every benchmark below at its default size
    python bench/pace.py async  --cases 200x8,1000x64,2000x256 --task-seconds 0.5 --poll-interval 0.1
    python bench/pace.py sync   --n 10000 --concurrency 64
    python bench/pace.py async  --cases 1000x64 --repeat 3   # alternated pairs, medians
    python bench/pace.py rerun  --n 10000 --big-n 1000 --big-mb 3
    python bench/pace.py rss    --sizes 1000,100000
    python bench/pace.py budget --n 100 --requests 50 --per-seconds 10 --qps 10
    python bench/pace.py window --n 200 --concurrency 32 --window 5

Each benchmark starts the emulator in its own process (``pipeline emulate``) and runs,
against it, ``pipeline run MANIFEST --config CFG --quiet`` and ``bench/plain_loop.py``
(aiohttp + a semaphore, polls every interval, writes each result to a file; no fsync,
no journal), resetting the emulator before each. Both are timed as whole processes,
spawn to exit, CPU and peak RSS from their own rusage (``bench/_harness.py``).
Inputs are tiny distinct JPEGs (about 1 KB), made once per invocation; ``rerun`` also
uses random-pixel JPEGs of ``--big-mb``.

1. ``async``: face swap, ``--task-seconds`` tasks polled every ``--poll-interval``;
   wall over the ideal ``ceil(N / C) x task time``.
2. ``sync``: emotion editor with no vendor latency; items/s and client CPU per item.
3. ``rerun``: a first run, then a rerun with every item done (one operation):
   items/s over the rerun's own ``wall_time_seconds`` in ``report.json`` (the plain
   loop's "rerun" skips inputs whose output file exists), tiny and big files.
4. ``rss``: peak RSS of the first run and the rerun at each of ``--sizes`` inputs, and
   its growth from the smallest size to the largest.
5. ``budget``: Perfect Corp's budget shape scaled down (``--requests`` per
   ``--per-seconds`` and ``--qps``), enforced by the emulator and stated in the
   pipeline's config: budget used (admitted API requests over the most the limit
   admits in the client's wall time), share of 429 answers, polls per task against
   ``ceil(task / interval) + 1``.
6. ``window``: Perfect Corp with a ``--window`` s polling window (the emulator expires a
   task left unpolled that long; the pipeline's config states the same window):
   tasks expired, results kept, charges per input.

``--json FILE`` (before the benchmark name) also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._harness import (
    MB,
    ROOT,
    ClientRun,
    EmulatorProcess,
    Inputs,
    close_spawner,
    compile_package,
    emit,
    note,
    ratio,
    run_pipeline,
    run_plain,
    table,
    workspace,
    write_config,
)

NAN = float("nan")
Results = dict[str, Any]


@dataclass
class Context:
    work: Path
    inputs: Inputs

    def fresh(self, name: str) -> Path:
        """An empty folder for one benchmark's config, logs and outputs."""
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


# -- figures -----------------------------------------------------------------------------------


def figures(run: ClientRun, *, ideal: float | None = None) -> dict[str, Any]:
    """Every figure of one client run, JSON-ready (None where not measured)."""
    m, v = run.measured, run.vendor
    submits = int(v.get("submits", 0))
    return _clean(
        {
            "client": run.client,
            "items": run.items,
            "succeeded": run.succeeded,
            "outputs_on_disk": run.outputs_on_disk,
            "wall_seconds": m.wall_seconds,
            "items_per_second": run.items_per_second,
            "wall_over_ideal": m.wall_seconds / ideal if ideal else None,
            "cpu_seconds": m.cpu_seconds,
            "cpu_ms_per_item": run.cpu_ms_per_item,
            "peak_rss_mb": m.rss_mb,
            "exit_code": m.exit_code,
            "timed_out": m.timed_out,
            "vendor_requests": v.get("requests", 0),
            "vendor_submits": submits,
            "vendor_polls": v.get("polls", 0),
            "vendor_downloads": v.get("downloads", 0),
            # None for sync operations (no polls) and for runs that created no task.
            "polls_per_task": v.get("polls", 0) / submits if submits and v.get("polls") else None,
            "rate_limited": v.get("rate_limited", 0),
            "expired": v.get("expired", 0),
            "charged": v.get("charged", 0),
            "charged_inputs": len(v.get("charged_by_input", {})),
            "paid_twice": sum(1 for n in v.get("charged_by_input", {}).values() if n > 1),
            "emulator_cpu_seconds": run.emulator_cpu_seconds,
        }
    )


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 4)
        out[key] = value
    return out


def _f(value: Any) -> float:
    """A figure for the table: None shows as '-'."""
    return NAN if value is None else float(value)


def _status(fig: dict[str, Any]) -> str:
    if fig["timed_out"]:
        return "TIMEOUT"
    return f"exit {fig['exit_code']}"


THROUGHPUT_HEADERS = (
    "client", "N", "C", "ok", "wall s", "items/s", "wall/ideal", "CPU ms/item",
    "peak RSS MB", "polls/task", "vendor CPU s", "end",
)  # fmt: skip


RERUN_HEADERS = (
    "files", "run", "N", "ok", "skipped", "own wall s", "items/s (own)", "process s",
    "items/s (process)", "CPU ms/item", "peak RSS MB", "submits", "end",
)  # fmt: skip
BUDGET_HEADERS = (
    "client", "N", "ok", "wall s", "API req", "req/item", "admitted", "capacity",
    "budget used %", "used % (own wall)", "429s", "429 %", "polls/task", "bound", "expired", "end",
)  # fmt: skip
WINDOW_HEADERS = (
    "client", "N", "C", "ok", "results kept", "expired", "charged", "paid twice",
    "report spent", "wall s", "polls/task", "end",
)  # fmt: skip


def throughput_row(fig: dict[str, Any], concurrency: int) -> list[object]:
    return [
        fig["client"],
        fig["items"],
        concurrency,
        fig["succeeded"],
        _f(fig["wall_seconds"]),
        _f(fig["items_per_second"]),
        _f(fig["wall_over_ideal"]),
        _f(fig["cpu_ms_per_item"]),
        _f(fig["peak_rss_mb"]),
        _f(fig["polls_per_task"]),
        _f(fig["emulator_cpu_seconds"]),
        _status(fig),
    ]


def pipeline_notes(run: ClientRun) -> str:
    """What the pipeline's own report says about polling (printed under a table)."""
    report = run.report
    parts = []
    for name in ("first_poll_seconds", "polls_per_task", "poll_lag_seconds", "paid_lost"):
        if report.get(name) not in (None, {}):
            parts.append(f"{name} {json.dumps(report[name], sort_keys=True)}")
    return "pipeline report: " + ("; ".join(parts) if parts else "(no polling figures)")


def alternated(
    repeat: int, run_pipe: Callable[[str], ClientRun], run_loop: Callable[[str], ClientRun]
) -> list[tuple[ClientRun, ClientRun]]:
    """``repeat`` (pipeline, plain loop) pairs, the order flipped every pair so that a
    machine getting busier or quieter weighs on both; ``run_*(suffix)`` makes one run."""
    pairs = []
    for i in range(repeat):
        suffix = f"-{i + 1}" if repeat > 1 else ""
        if i % 2 == 0:
            pipe = run_pipe(suffix)
            plain = run_loop(suffix)
        else:
            plain = run_loop(suffix)
            pipe = run_pipe(suffix)
        pairs.append((pipe, plain))
    return pairs


def median_run(runs: Sequence[ClientRun]) -> ClientRun:
    """The run of median wall time (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r.measured.wall_seconds)[(len(runs) - 1) // 2]


def median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return NAN
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def pair_ratios(pairs: Sequence[tuple[ClientRun, ClientRun]]) -> list[float]:
    """Throughput pipeline/plain of each pair."""
    return [_f(ratio(p.items_per_second, q.items_per_second)) for p, q in pairs]


def _listed(values: Sequence[float]) -> str:
    return " ".join(_fmt(v) for v in values)


# -- 1. async ----------------------------------------------------------------------------------


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``200x8,1000x64`` -> [(200, 8), (1000, 64)]."""
    cases = []
    for part in text.split(","):
        n, _, c = part.strip().partition("x")
        cases.append((int(n), int(c)))
    return cases


def bench_async(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("async")
    template = ctx.inputs.template()
    scenario = {"task_seconds": args.task_seconds, "sync_seconds": 0.0}
    cases_out: list[dict[str, Any]] = []
    rows: list[list[object]] = []
    notes: list[str] = []
    with EmulatorProcess(scenario, work) as emu:
        config = write_config(work / "config.yaml", emu.base_url, poll_interval=args.poll_interval)
        for n, c in parse_cases(args.cases):
            folder = ctx.inputs.folder(n)
            ideal = math.ceil(n / c) * args.task_seconds
            common: dict[str, Any] = {
                "work": work,
                "inputs": folder,
                "n": n,
                "op": "face-swap",
                "concurrency": c,
                "template": template,
                "timeout": args.timeout,
            }
            pairs = alternated(
                args.repeat,
                lambda sfx, n=n, c=c, common=common: run_pipeline(
                    emu, label=f"pipeline-{n}x{c}{sfx}", config=config, **common
                ),
                lambda sfx, n=n, c=c, common=common: run_plain(
                    emu, label=f"plain-{n}x{c}{sfx}", poll_interval=args.poll_interval, **common
                ),
            )
            pipe = median_run([p for p, _ in pairs])
            plain = median_run([q for _, q in pairs])
            fp, fl = figures(pipe, ideal=ideal), figures(plain, ideal=ideal)
            rows += [throughput_row(fp, c), throughput_row(fl, c)]
            notes.append(f"N={n} C={c}: {pipeline_notes(pipe)}")
            ratios = pair_ratios(pairs)
            case: dict[str, Any] = {
                "N": n,
                "C": c,
                "ideal_seconds": ideal,
                "pipeline": fp,
                "plain": fl,
                "throughput_ratio": _clean({"r": median(ratios)})["r"],
            }
            if args.repeat > 1:
                case["pairs"] = [
                    {"pipeline": figures(p, ideal=ideal), "plain": figures(q, ideal=ideal)}
                    for p, q in pairs
                ]
                notes.append(
                    f"N={n} C={c}, {args.repeat} alternated pairs: throughput pipeline/plain "
                    f"{_listed(ratios)}; wall/ideal pipeline "
                    f"{_listed([p.measured.wall_seconds / ideal for p, _ in pairs])}, plain "
                    f"{_listed([q.measured.wall_seconds / ideal for _, q in pairs])}"
                )
            cases_out.append(case)
    emit(
        f"1. async face swap: {args.task_seconds:g} s tasks, poll interval "
        f"{args.poll_interval:g} s, ideal = ceil(N / C) x {args.task_seconds:g} s"
        + (f"; each client's median-wall run of {args.repeat}" if args.repeat > 1 else "")
    )
    emit(table(THROUGHPUT_HEADERS, rows))
    for case in cases_out:
        p, q = case["pipeline"], case["plain"]
        emit(
            f"N={case['N']} C={case['C']}: throughput pipeline/plain "
            f"{_fmt(case['throughput_ratio'])}; wall/ideal pipeline {_fmt(p['wall_over_ideal'])}, "
            f"plain {_fmt(q['wall_over_ideal'])}; CPU ms/item pipeline "
            f"{_fmt(p['cpu_ms_per_item'])}, plain {_fmt(q['cpu_ms_per_item'])}"
        )
    for line in notes:
        emit(line)
    return {
        "task_seconds": args.task_seconds,
        "poll_interval": args.poll_interval,
        "cases": cases_out,
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


# -- 2. sync -----------------------------------------------------------------------------------


def bench_sync(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("sync")
    n, c = args.n, args.concurrency
    folder = ctx.inputs.folder(n)
    with EmulatorProcess({"sync_seconds": 0.0, "task_seconds": 0.0}, work) as emu:
        config = write_config(work / "config.yaml", emu.base_url, poll_interval=1.0)
        common: dict[str, Any] = {
            "work": work,
            "inputs": folder,
            "n": n,
            "op": "emotion-editor",
            "concurrency": c,
            "timeout": args.timeout,
        }
        pairs = alternated(
            args.repeat,
            lambda sfx: run_pipeline(emu, label=f"pipeline-{n}x{c}{sfx}", config=config, **common),
            lambda sfx: run_plain(emu, label=f"plain-{n}x{c}{sfx}", poll_interval=1.0, **common),
        )
    pipe = median_run([p for p, _ in pairs])
    plain = median_run([q for _, q in pairs])
    fp, fl = figures(pipe), figures(plain)
    ratios = pair_ratios(pairs)
    throughput = _clean({"r": median(ratios)})["r"]
    emit(
        "2. sync emotion editor: no vendor latency"
        + (f"; each client's median-wall run of {args.repeat}" if args.repeat > 1 else "")
    )
    emit(table(THROUGHPUT_HEADERS, [throughput_row(fp, c), throughput_row(fl, c)]))
    emit(
        f"N={n} C={c}: throughput pipeline/plain {_fmt(throughput)}; CPU ms/item pipeline "
        f"{_fmt(fp['cpu_ms_per_item'])}, plain {_fmt(fl['cpu_ms_per_item'])}"
    )
    out: dict[str, Any] = {
        "N": n,
        "C": c,
        "pipeline": fp,
        "plain": fl,
        "throughput_ratio": throughput,
    }
    if args.repeat > 1:
        emit(
            f"{args.repeat} alternated pairs: throughput pipeline/plain {_listed(ratios)}; CPU "
            f"ms/item pipeline {_listed([_f(p.cpu_ms_per_item) for p, _ in pairs])}, plain "
            f"{_listed([_f(q.cpu_ms_per_item) for _, q in pairs])}"
        )
        out["pairs"] = [{"pipeline": figures(p), "plain": figures(q)} for p, q in pairs]
    return out


# -- 3. rerun and 4. rss -------------------------------------------------------------------------


def first_and_rerun(
    emu: EmulatorProcess,
    *,
    work: Path,
    tag: str,
    folder: Path,
    n: int,
    concurrency: int,
    config: Path,
    timeout: float,
) -> dict[str, ClientRun]:
    """Both clients' first run and rerun over ``folder`` (emotion editor, one op)."""
    common: dict[str, Any] = {
        "work": work,
        "inputs": folder,
        "n": n,
        "op": "emotion-editor",
        "concurrency": concurrency,
        "timeout": timeout,
    }
    pipe_out, plain_out = work / f"out-pipeline-{tag}", work / f"out-plain-{tag}"
    runs = {
        "pipeline first": run_pipeline(
            emu, label=f"pipeline-{tag}-first", config=config, output=pipe_out, **common
        ),
        "pipeline rerun": run_pipeline(
            emu, label=f"pipeline-{tag}-rerun", config=config, output=pipe_out, **common
        ),
        "plain first": run_plain(
            emu, label=f"plain-{tag}-first", poll_interval=1.0, output=plain_out, **common
        ),
        "plain rerun": run_plain(
            emu,
            label=f"plain-{tag}-rerun",
            poll_interval=1.0,
            output=plain_out,
            skip_existing=True,
            **common,
        ),
    }
    return runs


def rerun_figures(run: ClientRun) -> dict[str, Any]:
    """``figures`` plus the rate over the run's own wall time (``report.json``)."""
    fig = figures(run)
    counts = run.report.get("counts", {})
    own_wall = run.report.get("wall_time_seconds") if run.client == "pipeline" else None
    fig["skipped"] = counts.get("skipped", run.report.get("skipped", 0))
    fig["report_wall_seconds"] = own_wall
    fig["items_per_second_report_wall"] = run.items / own_wall if own_wall else None
    return _clean(fig)


def bench_rerun(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("rerun")
    sets = [("tiny", args.n, 0), (f"{args.big_mb:g}MB", args.big_n, int(args.big_mb * MB))]
    out: dict[str, Any] = {}
    rows: list[list[object]] = []
    with EmulatorProcess({"sync_seconds": 0.0, "task_seconds": 0.0}, work) as emu:
        config = write_config(work / "config.yaml", emu.base_url, poll_interval=1.0)
        for tag, n, size in sets:
            if n <= 0:
                continue
            folder = ctx.inputs.folder(n, size)
            runs = first_and_rerun(
                emu,
                work=work,
                tag=tag,
                folder=folder,
                n=n,
                concurrency=args.concurrency,
                config=config,
                timeout=args.timeout,
            )
            out[tag] = {name: rerun_figures(run) for name, run in runs.items()}
            for name, fig in out[tag].items():
                rows.append(
                    [
                        tag,
                        name,
                        fig["items"],
                        fig["succeeded"],
                        fig["skipped"],
                        _f(fig["report_wall_seconds"]),
                        _f(fig["items_per_second_report_wall"]),
                        _f(fig["wall_seconds"]),
                        _f(fig["items"] / fig["wall_seconds"]),
                        _f(fig["cpu_ms_per_item"]),
                        _f(fig["peak_rss_mb"]),
                        fig["vendor_submits"],
                        _status(fig),
                    ]
                )
    emit(
        "3. rerun with every item done (emotion editor, one operation); "
        "'own wall' = report.json wall_time_seconds"
    )
    emit(table(RERUN_HEADERS, rows))
    for tag, runs in out.items():
        emit(
            f"{tag}: pipeline rerun {_fmt(runs['pipeline rerun']['items_per_second_report_wall'], 0)}"
            f" items/s over its own wall time, "
            f"{_fmt(runs['pipeline rerun']['items'] / runs['pipeline rerun']['wall_seconds'], 0)}"
            f" items/s spawn to exit; plain loop skip pass "
            f"{_fmt(runs['plain rerun']['items'] / runs['plain rerun']['wall_seconds'], 0)} items/s"
        )
    return {"concurrency": args.concurrency, "sets": out}


def bench_rss(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("rss")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    by_size: dict[int, dict[str, dict[str, Any]]] = {}
    rows: list[list[object]] = []
    with EmulatorProcess({"sync_seconds": 0.0, "task_seconds": 0.0}, work) as emu:
        config = write_config(work / "config.yaml", emu.base_url, poll_interval=1.0)
        for n in sizes:
            runs = first_and_rerun(
                emu,
                work=work,
                tag=str(n),
                folder=ctx.inputs.folder(n),
                n=n,
                concurrency=args.concurrency,
                config=config,
                timeout=args.timeout,
            )
            by_size[n] = {name: rerun_figures(run) for name, run in runs.items()}
            for name, fig in by_size[n].items():
                rows.append(
                    [
                        name,
                        n,
                        fig["succeeded"],
                        _f(fig["peak_rss_mb"]),
                        _f(fig["wall_seconds"]),
                        _f(fig["succeeded"] / fig["wall_seconds"]),
                        _f(fig["cpu_ms_per_item"]),
                        _status(fig),
                    ]
                )
    growth: dict[str, float | None] = {}
    low, high = sizes[0], sizes[-1]
    for name in by_size[low]:
        a, b = by_size[low][name]["peak_rss_mb"], by_size[high][name]["peak_rss_mb"]
        growth[name] = round(b / a, 3) if a and b else None
    emit("4. peak RSS (ru_maxrss of the client process), emotion editor, no vendor latency")
    emit(table(("run", "N", "ok", "peak RSS MB", "wall s", "items/s", "CPU ms/item", "end"), rows))
    emit(
        f"growth {low} -> {high} inputs (RSS ratio): "
        + ", ".join(f"{name} {_fmt(g)}x" for name, g in growth.items())
    )
    return {"sizes": sizes, "runs": {str(k): v for k, v in by_size.items()}, "growth": growth}


# -- 5. budget ---------------------------------------------------------------------------------


def capacity(requests: int, per_seconds: float, qps: float, seconds: float) -> float:
    """The most requests the limit can admit in ``seconds`` (an upper bound).

    Cut the run into consecutive windows of ``per_seconds`` (the last one shorter). In
    each, the sliding window admits at most ``requests``, and the token bucket at most
    what it holds (``max(1, qps)`` tokens, as the emulator's does) plus what it refills
    in that stretch; over the whole run the bucket admits at most its content plus
    ``qps x seconds``. Bounding each window by the bucket too matters for the last,
    short window: a 61.8 s run under 50 per 10 s and 10 QPS can get 328, not 350.
    """
    bucket = max(1.0, qps)
    total = 0.0
    start = 0.0
    while start < seconds:
        stretch = min(per_seconds, seconds - start)
        total += min(requests, bucket + qps * stretch)
        start += per_seconds
    return min(total, bucket + qps * seconds)


def bench_budget(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("budget")
    limit = {"requests": args.requests, "per_seconds": args.per_seconds, "qps": args.qps}
    scenario = {
        "task_seconds": args.task_seconds,
        "sync_seconds": 0.0,
        "rate_limit": limit,
        "rate_limit_vendors": ["perfectcorp"],
        "unpolled_window_seconds": args.window,
    }
    bound = math.ceil(args.task_seconds / args.poll_interval) + 1
    out: dict[str, Any] = {"limit": limit, "polls_per_task_bound": bound}
    rows: list[list[object]] = []
    with EmulatorProcess(scenario, work) as emu:
        config = write_config(
            work / "config.yaml",
            emu.base_url,
            poll_interval=args.poll_interval,
            rate_limits={"perfectcorp": limit},
            polling_windows={"perfectcorp": args.window},
        )
        common: dict[str, Any] = {
            "work": work,
            "inputs": ctx.inputs.folder(args.n),
            "n": args.n,
            "op": "ai-smile",
            "concurrency": args.concurrency,
            "timeout": args.timeout,
        }
        runs = {
            "pipeline": run_pipeline(emu, label="pipeline", config=config, **common),
            "plain": run_plain(emu, label="plain", poll_interval=args.poll_interval, **common),
        }
    for name, run in runs.items():
        fig = figures(run)
        admitted = fig["vendor_requests"] - fig["rate_limited"]
        cap = capacity(args.requests, args.per_seconds, args.qps, fig["wall_seconds"])
        # The same over the run's own wall time (report.json: start-up excluded).
        own = run.report.get("wall_time_seconds")
        own_cap = capacity(args.requests, args.per_seconds, args.qps, own) if own else None
        fig.update(
            _clean(
                {
                    "admitted": admitted,
                    "capacity": cap,
                    "budget_used": admitted / cap,
                    "budget_used_own_wall": admitted / own_cap if own_cap else None,
                    "share_429": fig["rate_limited"] / max(fig["vendor_requests"], 1),
                    "requests_per_item": fig["vendor_requests"] / max(fig["items"], 1),
                }
            )
        )
        out[name] = fig
        rows.append(
            [
                fig["client"],
                fig["items"],
                fig["succeeded"],
                _f(fig["wall_seconds"]),
                fig["vendor_requests"],
                _f(fig["requests_per_item"]),
                admitted,
                _f(cap),
                _f(100 * fig["budget_used"]),
                _f(None if own_cap is None else 100 * fig["budget_used_own_wall"]),
                fig["rate_limited"],
                _f(100 * fig["share_429"]),
                _f(fig["polls_per_task"]),
                bound,
                fig["expired"],
                _status(fig),
            ]
        )
    emit(
        f"5. binding budget (Perfect Corp shape scaled down: {args.requests} per "
        f"{args.per_seconds:g} s, {args.qps:g} QPS; vendor = config), AI Smile, "
        f"{args.task_seconds:g} s tasks, poll interval {args.poll_interval:g} s, "
        f"window {args.window:g} s; capacity over the client's spawn-to-exit wall time"
    )
    emit(table(BUDGET_HEADERS, rows))
    emit(pipeline_notes(runs["pipeline"]))
    budget = runs["pipeline"].report.get("rate_budget")
    if budget:
        emit(f"pipeline report: rate_budget {json.dumps(budget, sort_keys=True)}")
    return out


# -- 6. window ---------------------------------------------------------------------------------


def bench_window(args: argparse.Namespace, ctx: Context) -> Results:
    work = ctx.fresh("window")
    scenario: dict[str, Any] = {
        "task_seconds": args.task_seconds,
        "sync_seconds": 0.0,
        "unpolled_window_seconds": args.window,
    }
    limit = None
    if args.rate_limit:
        r, w, q = (float(x) for x in args.rate_limit.split("/"))
        limit = {"requests": int(r), "per_seconds": w, "qps": q}
        scenario |= {"rate_limit": limit, "rate_limit_vendors": ["perfectcorp"]}
    out: dict[str, Any] = {"window_seconds": args.window, "rate_limit": limit}
    rows: list[list[object]] = []
    with EmulatorProcess(scenario, work) as emu:
        config = write_config(
            work / "config.yaml",
            emu.base_url,
            poll_interval=args.poll_interval,
            rate_limits={"perfectcorp": limit} if limit else None,
            polling_windows={"perfectcorp": args.window},
        )
        common: dict[str, Any] = {
            "work": work,
            "inputs": ctx.inputs.folder(args.n),
            "n": args.n,
            "op": "ai-smile",
            "concurrency": args.concurrency,
            "timeout": args.timeout,
        }
        runs = {
            "pipeline": run_pipeline(emu, label="pipeline", config=config, **common),
            "plain": run_plain(emu, label="plain", poll_interval=args.poll_interval, **common),
        }
    for name, run in runs.items():
        fig = figures(run)
        spent = run.report.get("credits_spent", {}).get("perfectcorp", {}).get("amount")
        fig["report_credits_spent"] = spent
        fig["report_paid_lost"] = run.report.get("paid_lost")
        out[name] = fig
        rows.append(
            [
                fig["client"],
                fig["items"],
                args.concurrency,
                fig["succeeded"],
                fig["outputs_on_disk"],
                fig["expired"],
                fig["charged"],
                fig["paid_twice"],
                _f(spent),
                _f(fig["wall_seconds"]),
                _f(fig["polls_per_task"]),
                _status(fig),
            ]
        )
    emit(
        f"6. Perfect Corp polling window {args.window:g} s (emulator expiry = config "
        f"polling_window_seconds), AI Smile, {args.task_seconds:g} s tasks, poll interval "
        f"{args.poll_interval:g} s, rate limit {args.rate_limit or 'none'}"
    )
    emit(table(WINDOW_HEADERS, rows))
    emit(pipeline_notes(runs["pipeline"]))
    return out


# -- the command -------------------------------------------------------------------------------

BENCHMARKS: dict[str, Callable[[argparse.Namespace, Context], Results]] = {
    "async": bench_async,
    "sync": bench_sync,
    "rerun": bench_rerun,
    "rss": bench_rss,
    "budget": bench_budget,
    "window": bench_window,
}


_REPEAT_HELP = (
    "run both clients this many times, alternating which goes first; show each one's "
    "median-wall run and the median of the pairs' throughput ratios"
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", type=Path, help="keep inputs, logs and outputs here")
    ap.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    sub = ap.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    sub.add_parser("all", help="every benchmark at its default size")

    p = sub.add_parser("async", help="1. async face swap")
    p.add_argument("--cases", default="200x8,1000x64,2000x256", help="NxC,NxC,...")
    p.add_argument("--task-seconds", type=float, default=0.5)
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--timeout", type=float, default=600, help="per client run, seconds")
    p.add_argument("--repeat", type=int, default=1, help=_REPEAT_HELP)

    p = sub.add_parser("sync", help="2. sync emotion editor")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--repeat", type=int, default=1, help=_REPEAT_HELP)

    p = sub.add_parser("rerun", help="3. rerun with everything done")
    p.add_argument("--n", type=int, default=10_000, help="tiny inputs")
    p.add_argument("--big-n", type=int, default=1000, help="big inputs (0: skip)")
    p.add_argument("--big-mb", type=float, default=3.0, help="size of a big input, MB")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=1800)

    p = sub.add_parser("rss", help="4. peak RSS against the number of inputs")
    p.add_argument("--sizes", default="1000,100000")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=3600)

    p = sub.add_parser("budget", help="5. a binding rate budget")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--per-seconds", type=float, default=10.0)
    p.add_argument("--qps", type=float, default=10.0)
    p.add_argument("--task-seconds", type=float, default=1.0)
    p.add_argument("--poll-interval", type=float, default=0.5)
    p.add_argument("--window", type=float, default=10.0, help="polling window, seconds")
    p.add_argument("--timeout", type=float, default=900)

    p = sub.add_parser("window", help="6. the Perfect Corp polling window")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--window", type=float, default=5.0)
    p.add_argument("--task-seconds", type=float, default=0.5)
    p.add_argument("--poll-interval", type=float, default=0.1)
    p.add_argument("--rate-limit", default="", help="R/W/Q, e.g. 250/300/5 (default: none)")
    p.add_argument("--timeout", type=float, default=600)
    return ap


def machine_line() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} cores, load average {load}; Python "
        f"{platform.python_version()}; code {commit or f'{ROOT} (not a git checkout)'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = list(BENCHMARKS) if args.bench == "all" else [args.bench]
    shown = shlex.join(["python", "bench/pace.py", *(sys.argv[1:] if argv is None else argv)])
    emit(f"$ {shown}")
    emit(machine_line())
    compile_package()
    results: dict[str, Any] = {}
    with workspace(args.workdir) as work:
        ctx = Context(work=work, inputs=Inputs(work / "inputs"))
        try:
            for name in names:
                bench_args = args if args.bench != "all" else parser.parse_args([name])
                emit("")
                note(f"benchmark {name}")
                results[name] = BENCHMARKS[name](bench_args, ctx)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        finally:
            close_spawner()
    return 0


if __name__ == "__main__":
    sys.exit(main())
