"""Shared machinery of the pace benchmarks: inputs, the emulator process, timed clients.

Everything a benchmark measures runs as its own process, the way an outside checker
runs it:

- the emulator: ``python -m pipeline emulate --port N --scenario FILE``
  (:class:`EmulatorProcess`), reset between clients through ``POST /_emulator/reset``;
- the pipeline: ``pipeline run MANIFEST --config CFG --quiet`` (:func:`run_pipeline`),
  with a config whose providers' ``base_url`` is the emulator and dummy keys in the
  environment variables it names;
- the plain loop: ``python bench/plain_loop.py ...`` (:func:`run_plain`).

Both clients are timed the same way (:func:`run_measured`): spawn to exit on a
monotonic clock, CPU (user + system) and peak RSS (``ru_maxrss``) from the child's own
rusage as ``os.wait4`` returns it, interpreter start-up included.
"""

from __future__ import annotations

import atexit
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PLAIN_LOOP = ROOT / "bench" / "plain_loop.py"
SPAWNER = ROOT / "bench" / "_spawn.py"
AILAB_KEY = "bench-ailab-key"
PERFECTCORP_KEY = "bench-perfectcorp-key"
MB = 1024 * 1024
UNLIMITED_ACCOUNTS: dict[str, Any] = {"ailab_credits": {"common": 1e12}, "perfectcorp_units": 1e12}

# op short name -> (manifest entry, vendor). The plain loop takes the same short names.
OPS: dict[str, tuple[dict[str, Any], str]] = {
    "face-swap": ({"op": "ailab/face-swap", "params": {"image_template": "TEMPLATE"}}, "ailab"),
    "emotion-editor": (
        {"op": "ailab/emotion-editor", "params": {"service_choice": 12}},
        "ailab",
    ),
    "ai-smile": (
        {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
        "perfectcorp",
    ),
}


# -- inputs ------------------------------------------------------------------------------------


def tiny_jpeg(index: int) -> bytes:
    """A 64x64 JPEG (about 1 KB) whose pixels encode ``index``: distinct bytes per index.

    The pipeline keys work by content, so every input must differ; 24 marker pixels
    carry the index's bits and the background colour varies with it.
    """
    img = Image.new("RGB", (64, 64), ((index * 37) % 256, (index * 91) % 256, (index * 13) % 256))
    pixels = img.load()
    assert pixels is not None
    for bit in range(24):
        on = (index >> bit) & 1
        pixels[(bit % 8) * 8 + 2, (bit // 8) * 8 + 2] = (255, 255, 255) if on else (0, 0, 0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def noise_jpeg(target_bytes: int) -> bytes:
    """A JPEG of random pixels of about ``target_bytes`` (real pixels, not padding).

    Random RGB at quality 95 without chroma subsampling takes about 2.4 bytes a pixel;
    the side is fitted from that, then corrected once from the first try.
    """
    side = int(math.sqrt(target_bytes / 2.42))
    data = b""
    for _ in range(2):
        img = Image.frombytes("RGB", (side, side), os.urandom(side * side * 3))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95, subsampling=0)
        data = buf.getvalue()
        side = max(16, int(side * math.sqrt(target_bytes / len(data))))
    return data


class Inputs:
    """Input folders made once per invocation, under one temporary root.

    ``folder(n)`` holds ``n`` distinct tiny JPEGs; ``folder(n, size=3 * MB)`` holds
    ``n`` distinct noise JPEGs of about that size. Each folder is made on first use
    and reused by every later benchmark of the same invocation.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._made: dict[tuple[int, int], Path] = {}

    def folder(self, n: int, size: int = 0) -> Path:
        key = (n, size)
        if key not in self._made:
            path = self.root / (f"in-{n}" if not size else f"in-{n}-{size}")
            path.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            for i in range(n):
                data = noise_jpeg(size) if size else tiny_jpeg(i)
                (path / f"p{i:07d}.jpg").write_bytes(data)
            note(f"made {n} inputs in {path} ({time.monotonic() - started:.1f} s)")
            self._made[key] = path
        return self._made[key]

    def template(self) -> Path:
        path = self.root / "template.jpg"
        if not path.exists():
            path.write_bytes(tiny_jpeg(2**24 + 7))  # an index no input uses
        return path


def compile_package() -> None:
    """Byte-compile the pipeline's modules before any client is timed, as a wheel
    install does at install time. An editable install with ``PYTHONDONTWRITEBYTECODE``
    set (this machine sets it) compiles every module changed since its last cached
    bytecode at each start, inside the measured start-up: tens of milliseconds a run
    that no installed copy pays."""
    import compileall

    compileall.compile_dir(ROOT / "pipeline", quiet=1)


@contextmanager
def workspace(keep: Path | None = None) -> Iterator[Path]:
    """A scratch folder for one invocation (``keep``: use it and leave it behind)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="pace-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- processes ---------------------------------------------------------------------------------


def note(message: str) -> None:
    """Progress for the human watching (stderr, so stdout stays the figures)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def child_env() -> dict[str, str]:
    """The environment every child gets: dummy keys, the repository on PYTHONPATH."""
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class Measured:
    """One child process, spawn to exit."""

    wall_seconds: float
    user_seconds: float
    sys_seconds: float
    max_rss_kb: int  # ru_maxrss: kilobytes on Linux
    exit_code: int
    timed_out: bool
    stdout: Path
    stderr: Path

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.sys_seconds

    @property
    def rss_mb(self) -> float:
        return self.max_rss_kb / 1024


def run_measured(
    argv: Sequence[str],
    *,
    logs: Path,
    label: str,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> Measured:
    """Run ``argv`` to its end and measure it from its own rusage (``os.wait4``).

    The child is spawned by a lean helper process (``bench/_spawn.py``, which says why).
    Past ``timeout`` the child gets SIGTERM (the pipeline stops cleanly and writes its
    report), and SIGKILL 30 s later. stdout and stderr go to ``logs/label.out`` and
    ``logs/label.err``. ``argv[0]`` is resolved on PATH if it is not a path.
    """
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{label}.out", logs / f"{label}.err"
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0]) or argv[0]
    answer = _spawner().run(
        {
            "argv": [program, *argv[1:]],
            "env": dict(env if env is not None else child_env()),
            "stdout": str(out),
            "stderr": str(err),
            "timeout": timeout,
        }
    )
    return Measured(
        wall_seconds=answer["wall"],
        user_seconds=answer["utime"],
        sys_seconds=answer["stime"],
        max_rss_kb=answer["maxrss_kb"],
        exit_code=answer["exit_code"],
        timed_out=answer["timed_out"],
        stdout=out,
        stderr=err,
    )


class _Spawner:
    """The ``bench/_spawn.py`` helper process, started on first use."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(SPAWNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the spawner exited {self.proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer


_SPAWNER: list[_Spawner] = []


def _spawner() -> _Spawner:
    if not _SPAWNER or _SPAWNER[0].proc.poll() is not None:
        _SPAWNER[:] = [_Spawner()]
    return _SPAWNER[0]


@atexit.register
def close_spawner() -> None:
    """Stop the spawner (end of its input); a later run starts a new one."""
    for spawner in _SPAWNER:
        assert spawner.proc.stdin is not None and spawner.proc.stdout is not None
        spawner.proc.stdin.close()
        spawner.proc.wait(timeout=30)
        spawner.proc.stdout.close()
    _SPAWNER.clear()


class EmulatorProcess:
    """``python -m pipeline emulate`` in its own process, on a free loopback port."""

    def __init__(self, scenario: Mapping[str, Any], work: Path) -> None:
        self.scenario_path = work / "scenario.yaml"
        # Accounts that never run dry: the emulator's default 1e6 AILab credits pay for
        # only 83 333 emotion edits (12 each), fewer than the RSS benchmark sends.
        knobs = {**UNLIMITED_ACCOUNTS, **scenario}
        self.scenario_path.write_text(yaml.safe_dump(knobs, sort_keys=False))
        self.log = work / "emulator.log"
        port = free_port()
        argv = [sys.executable, "-m", "pipeline", "emulate", "--port", str(port)]
        argv += ["--scenario", str(self.scenario_path)]
        with self.log.open("wb") as sink:
            self.proc = subprocess.Popen(
                argv, env=child_env(), stdout=sink, stderr=subprocess.STDOUT
            )
        self.base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the emulator exited {self.proc.returncode}; see {self.log}")
            try:
                self.stats()
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.close()
                    raise SystemExit(f"the emulator did not come up; see {self.log}") from None
                time.sleep(0.1)

    def _call(self, method: str, path: str) -> dict[str, Any]:
        request = urllib.request.Request(self.base_url + path, method=method)
        with urllib.request.urlopen(request, timeout=60) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    def cpu_seconds(self) -> float:
        """The emulator's CPU so far (user + system, from /proc; NaN where there is none)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return float("nan")
        # Fields 14 and 15 of proc(5) (utime, stime), counted after the ")" of comm.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict[str, Any]:
        """``GET /_emulator/stats``: both vendors' counters."""
        return self._call("GET", "/_emulator/stats")

    def reset(self) -> None:
        """``POST /_emulator/reset``: a fresh vendor for the next client."""
        self._call("POST", "/_emulator/reset")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the two clients ---------------------------------------------------------------------------


@dataclass
class ClientRun:
    """What one client run gave: its process figures, its own counts, the vendor's view."""

    client: str  # "pipeline" or "plain loop"
    items: int
    succeeded: int
    measured: Measured
    vendor: dict[str, Any]  # the emulator's counters of the vendor used, after the run
    report: dict[str, Any] = field(default_factory=dict)  # report.json or the loop's summary
    outputs_on_disk: int = 0
    emulator_cpu_seconds: float = float("nan")  # the vendor's CPU during this run

    @property
    def items_per_second(self) -> float:
        return self.succeeded / self.measured.wall_seconds

    @property
    def cpu_ms_per_item(self) -> float:
        """Client CPU per item done (succeeded or skipped), so a cut-short run is not flattered."""
        return 1000 * self.measured.cpu_seconds / max(self.succeeded, 1)


def write_config(
    path: Path,
    base_url: str,
    *,
    poll_interval: float,
    rate_limits: Mapping[str, Mapping[str, float] | None] | None = None,
    polling_windows: Mapping[str, float] | None = None,
) -> Path:
    """A pipeline config pointing both providers at ``base_url``.

    ``rate_limits``: the client's stated budget per vendor (absent: none, so the
    pipeline's built-in Perfect Corp limit is switched off). ``polling_windows``:
    ``polling_window_seconds`` per vendor (absent: the built-in default).
    """
    providers: dict[str, dict[str, Any]] = {}
    for vendor, env_var in (("ailab", "AILAB_API_KEY"), ("perfectcorp", "PERFECTCORP_API_KEY")):
        section: dict[str, Any] = {
            "base_url": base_url,
            "api_key_env": env_var,
            "poll_interval_seconds": poll_interval,
            "rate_limit": dict(rl) if (rl := (rate_limits or {}).get(vendor)) else None,
        }
        if polling_windows and vendor in polling_windows:
            section["polling_window_seconds"] = polling_windows[vendor]
        providers[vendor] = section
    path.write_text(yaml.safe_dump({"providers": providers}, sort_keys=False))
    return path


def write_manifest(
    path: Path,
    *,
    inputs: Path,
    op: str,
    output: Path,
    concurrency: int,
    template: Path | None = None,
) -> Path:
    entry, _ = OPS[op]
    params = dict(entry["params"])
    if "image_template" in params:
        assert template is not None, "face swap needs a template"
        params["image_template"] = str(template)
    doc = {
        "name": f"bench-{op}",
        "inputs": [str(inputs / "*.jpg")],
        "operations": [{"op": entry["op"], "params": params}],
        "output": str(output),
        "concurrency": concurrency,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def pipeline_argv(manifest: Path, config: Path) -> list[str]:
    """``pipeline run MANIFEST --config CFG --quiet`` (the installed command if found)."""
    script = Path(sys.executable).with_name("pipeline")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]
    profile_dir = os.environ.get("PACE_PYSPY_DIR")
    if profile_dir:
        # Profiling aid (README "Performance"): run the pipeline under py-spy, one
        # collapsed-stack file per run; the timings of such a run are not figures.
        out = Path(profile_dir) / f"{manifest.stem}-{time.monotonic_ns()}.txt"
        head = [
            "py-spy",
            "record",
            *os.environ.get("PACE_PYSPY_ARGS", "--threads").split(),
            "-r",
            "250",
            "-f",
            "raw",
            "-o",
            str(out),
            "--",
            *head,
        ]
    return [*head, "run", str(manifest), "--config", str(config), "--quiet"]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data


def count_pipeline_outputs(output: Path) -> int:
    """Succeeded lines of ``results.jsonl`` whose output file exists."""
    count = 0
    try:
        lines = (output / "results.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        row = json.loads(line)
        if row.get("status") in ("succeeded", "skipped") and row.get("output"):
            count += Path(row["output"]).is_file()
    return count


def run_pipeline(
    emulator: EmulatorProcess,
    *,
    work: Path,
    label: str,
    inputs: Path,
    n: int,
    op: str,
    concurrency: int,
    config: Path,
    template: Path | None = None,
    output: Path | None = None,
    timeout: float | None = None,
    reset: bool = True,
) -> ClientRun:
    """One ``pipeline run`` against ``emulator`` (reset first unless ``reset`` is False)."""
    if reset:
        emulator.reset()
    output = output or work / f"out-{label}"
    manifest = write_manifest(
        work / f"{label}.yaml",
        inputs=inputs,
        op=op,
        output=output,
        concurrency=concurrency,
        template=template,
    )
    note(f"{label}: pipeline run, {n} items at concurrency {concurrency}")
    emu_cpu = emulator.cpu_seconds()
    measured = run_measured(
        pipeline_argv(manifest, config), logs=work / "logs", label=label, timeout=timeout
    )
    emu_cpu = emulator.cpu_seconds() - emu_cpu
    report = read_json(output / "report.json")
    counts = report.get("counts", {})
    vendor = OPS[op][1]
    return ClientRun(
        client="pipeline",
        items=n,
        succeeded=int(counts.get("succeeded", 0)) + int(counts.get("skipped", 0)),
        measured=measured,
        vendor=emulator.stats()[vendor],
        report=report,
        outputs_on_disk=count_pipeline_outputs(output),
        emulator_cpu_seconds=emu_cpu,
    )


def run_plain(
    emulator: EmulatorProcess,
    *,
    work: Path,
    label: str,
    inputs: Path,
    n: int,
    op: str,
    concurrency: int,
    poll_interval: float,
    template: Path | None = None,
    output: Path | None = None,
    skip_existing: bool = False,
    timeout: float | None = None,
    reset: bool = True,
) -> ClientRun:
    """One run of ``bench/plain_loop.py`` against ``emulator``."""
    if reset:
        emulator.reset()
    output = output or work / f"out-{label}"
    summary = work / f"{label}.summary.json"
    argv = [
        sys.executable,
        str(PLAIN_LOOP),
        "--base-url",
        emulator.base_url,
        "--op",
        op,
        "--inputs",
        str(inputs),
        "--out",
        str(output),
        "--concurrency",
        str(concurrency),
        "--poll-interval",
        str(poll_interval),
        "--summary",
        str(summary),
    ]
    if template is not None:
        argv += ["--template", str(template)]
    if skip_existing:
        argv.append("--skip-existing")
    note(f"{label}: plain loop, {n} items at concurrency {concurrency}")
    emu_cpu = emulator.cpu_seconds()
    measured = run_measured(argv, logs=work / "logs", label=label, timeout=timeout)
    emu_cpu = emulator.cpu_seconds() - emu_cpu
    report = read_json(summary)
    vendor = OPS[op][1]
    return ClientRun(
        client="plain loop",
        items=n,
        succeeded=int(report.get("succeeded", 0)) + int(report.get("skipped", 0)),
        measured=measured,
        vendor=emulator.stats()[vendor],
        report=report,
        outputs_on_disk=sum(1 for _ in output.glob("*.jpg")) if output.is_dir() else 0,
        emulator_cpu_seconds=emu_cpu,
    )


# -- printing ----------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table (right-aligned numbers, left-aligned text)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value != value:  # NaN: not measured
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def emit(text: str) -> None:
    print(text, flush=True)
