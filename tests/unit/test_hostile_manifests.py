"""Bad manifests and configs, as a user (or an attacker) writes them, through the CLI.

Every case runs ``pipeline validate``, ``pipeline run --dry-run`` and ``pipeline run``
(in-process through :func:`pipeline.cli.main`, a few also as real subprocesses) and
must end the same way: exit 2, exactly one line on stderr naming the file (and the
line and field where there is one), nothing on stdout, no traceback, no output
folder created and not one connection made to the vendor address the config names
(a real listening socket whose backlog is checked afterwards).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import load_manifest
from pipeline.yamlsrc import MAX_ALIAS_EXPANSION, MAX_YAML_BYTES
from tests.conftest import make_portrait

GOOD_MANIFEST = """\
name: hostile
inputs: ["in/*.jpg"]
operations:
  - op: ailab/face-swap
    params: {image_template: template.jpg}
  - op: perfectcorp/ai-smile
    params: {expression_type: teeth}
output: out
max_attempts: 1
"""


def good_config(url: str) -> str:
    return f"""\
providers:
  ailab:
    base_url: {url}
  perfectcorp:
    base_url: {url}
timeouts:
  connect_seconds: 1
  request_seconds: 1
"""


@dataclass
class Job:
    """A job folder: a real input, a real template, a manifest and a config."""

    root: Path
    manifest: Path
    config: Path
    url: str  # a loopback address that listens but never answers
    listener: socket.socket

    def connections(self) -> int:
        """How many connections reached the listener (its backlog, drained)."""
        count = 0
        self.listener.setblocking(False)
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Job]:
    root = tmp_path / "job"
    make_portrait(root / "in" / "a.jpg", seed=1)
    make_portrait(root / "template.jpg", seed=2)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    manifest = root / "job.yaml"
    manifest.write_text(GOOD_MANIFEST)
    config = root / "config.yaml"
    config.write_text(good_config(url))
    monkeypatch.setenv("AILAB_API_KEY", "dummy-ailab-key")
    monkeypatch.setenv("PERFECTCORP_API_KEY", "dummy-perfectcorp-key")
    monkeypatch.chdir(root)
    try:
        yield Job(root, manifest, config, url, listener)
    finally:
        listener.close()


MODES = {
    "validate": ["validate"],
    "dry-run": ["run", "--dry-run"],
    "run": ["run", "--quiet"],
}


def expect_refused(
    job: Job,
    capsys: pytest.CaptureFixture[str],
    *,
    file: Path,
    line: int | None,
    field: str,
    manifest: Path | None = None,
) -> None:
    """Run every mode; each must refuse with one ``FILE[:LINE]: ...field...`` line."""
    target = manifest or job.manifest
    for mode, words in MODES.items():
        code = main([words[0], str(target), "--config", str(job.config), *words[1:]])
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert code == 2, (mode, err)
        assert out == "", (mode, out)
        assert len(lines) == 1, (mode, err)
        assert "Traceback" not in err
        message = lines[0]
        assert message.startswith("pipeline: error: "), (mode, message)
        where = f"{file}:{line}: " if line is not None else f"{file}"
        assert where in message, (mode, message, where)
        assert field in message, (mode, message, field)
    assert not (job.root / "out").exists()
    assert job.connections() == 0


def test_the_good_job_passes(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    # The harness itself: the same files, unmodified, validate cleanly.
    assert main(["validate", str(job.manifest), "--config", str(job.config)]) == 0
    out, err = capsys.readouterr()
    assert "1 input(s), 2 variant(s), 2 work item(s); 0 input(s) with problems" in out
    assert err == ""


# ------------------------------------------------------------------- bad manifests


def _alias_bomb() -> bytes:
    # Billion laughs: 9 levels of 9 aliases, 9^9 strings once expanded, ~340 bytes.
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return (GOOD_MANIFEST + "\n".join(lines) + "\n").encode()


LAST = -1  # expected on the manifest's last line


def _with(**changes: str) -> Callable[[Path], bytes]:
    """The good manifest with one-line top-level keys moved to the end with new values.

    (``operations`` spans several lines: change it with :func:`_raw` instead.)
    """

    def build(_root: Path) -> bytes:
        text = GOOD_MANIFEST
        for key, value in changes.items():
            assert key != "operations"
            lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}:")]
            text = "\n".join(lines) + f"\n{key}: {value}\n"
        return text.encode()

    return build


def _template(make: Callable[[Path], None], *, auto_fix: bool = False) -> Callable[[Path], bytes]:
    """The good manifest whose face-swap template is ``bad/template`` made by ``make``."""

    def build(root: Path) -> bytes:
        (root / "bad").mkdir(exist_ok=True)
        make(root / "bad" / "template")
        text = GOOD_MANIFEST.replace("template.jpg", "bad/template")
        return (text + ("auto_fix: true\n" if auto_fix else "")).encode()

    return build


def _text(path: Path) -> None:
    path.write_text("this is not a face\n")


def _truncated_jpeg(path: Path) -> None:
    data = make_portrait(path.with_suffix(".full.jpg"), seed=3).read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _gif(path: Path) -> None:
    Image.new("RGB", (120, 160), (200, 150, 120)).save(path, format="GIF")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink_to(target: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        os.symlink(target, path)

    return make


def _output_link(target: str) -> Callable[[Path], bytes]:
    def build(root: Path) -> bytes:
        os.symlink(target, root / "outlink")
        return GOOD_MANIFEST.replace("output: out", "output: outlink/results").encode()

    return build


def _raw(data: bytes) -> Callable[[Path], bytes]:
    return lambda _root: data


OPERATIONS_BLOCK = GOOD_MANIFEST[
    GOOD_MANIFEST.index("operations:") : GOOD_MANIFEST.index("output:")
]
OUTPUT_LINE = 8  # "output:" in GOOD_MANIFEST
TEMPLATE_LINE = 5
HUGE = 2 * MAX_YAML_BYTES

# (id, build(root) -> manifest bytes, line or None, text the line must contain)
MANIFEST_CASES: list[tuple[str, Callable[[Path], bytes], int | None, str]] = [
    ("nul-byte", _raw(GOOD_MANIFEST.replace("out\n", "o\x00ut\n").encode()), 8, "U+0000 (NUL)"),
    ("invalid-utf8", _raw(GOOD_MANIFEST.encode() + b"name2: caf\xe9\n"), 10, "not UTF-8"),
    ("utf16-bom", _raw(GOOD_MANIFEST.encode("utf-16")), 1, "UTF-16"),
    ("utf16-no-bom", _raw(GOOD_MANIFEST.encode("utf-16-le")), 1, "U+0000"),
    ("nested-lists", _raw(b"inputs: " + b"[" * 10_000 + b"]" * 10_000 + b"\n"), 1, "inputs[0][0]"),
    ("nested-maps", _raw(b"inputs: " + b"{a: " * 10_000 + b"}" * 10_000 + b"\n"), 1, "inputs.a.a"),
    ("alias-bomb", _raw(_alias_bomb()), None, "alias bomb"),
    ("huge-file", _raw(GOOD_MANIFEST.encode() + b"#" * HUGE + b"\n"), None, "larger than 1 MB"),
    ("self-anchor", _raw(GOOD_MANIFEST.encode() + b"loop: &x [1, *x]\n"), 10, "loop"),
    ("tab-indent", _raw(GOOD_MANIFEST.replace("  - op: p", "\t- op: p").encode()), 6, "tabs"),
    ("just-a-scalar", _raw(b"hello\n"), 1, "(top level)"),
    ("just-a-list", _raw(b"- inputs\n- output\n"), 1, "(top level)"),
    ("empty-file", _raw(b""), 1, "(top level)"),
    ("duplicate-key", _with(name="a\nname: b"), LAST, "name: duplicate key"),
    ("unknown-key", _with(colour="red"), LAST, "colour: unknown key"),
    ("wrong-type", _with(concurrency="'8'"), LAST, "concurrency: input should be a valid integer"),
    ("bool-for-int", _with(max_attempts="true"), LAST, "max_attempts: input should be a valid"),
    ("concurrency-negative", _with(concurrency="-1"), LAST, "concurrency: "),
    ("concurrency-zero", _with(concurrency="0"), LAST, "concurrency: "),
    ("concurrency-huge", _with(concurrency="100000000000000000000"), LAST, "concurrency: "),
    ("max-attempts-zero", _with(max_attempts="0"), LAST, "max_attempts: "),
    (
        "list-for-mapping",
        _raw(GOOD_MANIFEST.replace(OPERATIONS_BLOCK, "operations: [[ailab/face-swap]]\n").encode()),
        3,
        "operations[0]: expected a mapping",
    ),
    (
        "params-a-list",
        _raw(GOOD_MANIFEST.replace("{expression_type: teeth}", "[teeth]").encode()),
        7,
        "operations[1].params: expected a mapping",
    ),
    ("inputs-empty", _with(inputs="[]"), LAST, "inputs: give at least one"),
    ("inputs-a-mapping", _with(inputs="{a: 1}"), LAST, "inputs: expected a list"),
    ("input-dotdot-after-glob", _with(inputs="['in/*/../a.jpg']"), LAST, "inputs: pattern"),
    ("input-nul", _with(inputs='["in/\\0*.jpg"]'), LAST, "inputs: pattern"),
    (
        "unknown-enum",
        _raw(GOOD_MANIFEST.replace("expression_type: teeth", "expression_type: grin").encode()),
        7,
        "operations[1].params.expression_type: unknown value 'grin'",
    ),
    (
        "unknown-operation",
        _raw(GOOD_MANIFEST.replace("perfectcorp/ai-smile", "x/y").encode()),
        6,
        "operations[1].op: unknown operation",
    ),
    (
        "huge-cross-product",
        _raw(
            GOOD_MANIFEST.replace(
                "perfectcorp/ai-smile\n    params: {expression_type: teeth}",
                "ailab/face-beauty-pro\n    params: {"
                + ", ".join(
                    f"{n}: [{','.join(str(i) for i in range(40))}]"
                    for n in ("whitening", "smoothing", "thinface", "shrink_face")
                )
                + "}",
            ).encode()
        ),
        7,
        "operations[1].params: the lists expand into 2560000",
    ),
    ("int-of-5000-digits", _with(concurrency="1" * 5000), LAST, "cannot read this value"),
    ("impossible-date", _with(name="2026-13-45"), LAST, "cannot read this value"),
    ("key-with-newline", _with(**{'"a\\nb"': "1"}), LAST, "['a\\nb']: unknown key"),
    ("name-with-newline", _with(name='"a\\nb"'), LAST, "name: must be one line"),
    ("max-failure-ratio-zero", _with(max_failure_ratio="0"), LAST, "max_failure_ratio: "),
    ("max-failure-ratio-over-1", _with(max_failure_ratio="1.5"), LAST, "max_failure_ratio: "),
    ("max-failure-ratio-text", _with(max_failure_ratio="half"), LAST, "max_failure_ratio: "),
    ("min-items-zero", _with(min_items_for_failure_ratio="0"), LAST, "min_items_for_failure_ratio"),
    ("max-credits-infinite", _with(max_credits=".inf"), LAST, "max_credits: must be a finite"),
    ("output-in-proc", _with(output="/proc/self/pipeline-out"), LAST, "inside /proc"),
    ("output-in-sys", _with(output="/sys/pipeline-out"), LAST, "inside /sys"),
    ("output-in-dev", _with(output="/dev/pipeline-out"), LAST, "inside /dev"),
    ("output-link-into-proc", _output_link("/proc/self"), OUTPUT_LINE, "inside /proc"),
    ("output-is-a-file", _with(output="template.jpg"), LAST, "template.jpg is a file"),
    ("output-under-a-file", _with(output="template.jpg/out"), LAST, "template.jpg (above"),
    ("output-broken-link", _output_link("nowhere"), OUTPUT_LINE, "is a link to nothing"),
    ("output-nul", _with(output='"o\\0ut"'), LAST, "output: contains control characters"),
    ("template-text-file", _template(_text), TEMPLATE_LINE, "not an image that can be read"),
    ("template-truncated-jpeg", _template(_truncated_jpeg), TEMPLATE_LINE, "truncated"),
    ("template-gif", _template(_gif), TEMPLATE_LINE, "GIF is not accepted by ailab/face-swap"),
    ("template-missing", _template(lambda p: None), TEMPLATE_LINE, "file not found"),
    ("template-folder", _template(lambda p: p.mkdir()), TEMPLATE_LINE, "is a folder"),
    ("template-fifo", _template(_fifo), TEMPLATE_LINE, "is not a regular file"),
    ("template-device", _template(_symlink_to("/dev/zero")), TEMPLATE_LINE, "not a regular file"),
    (
        "template-text-with-auto-fix",
        _template(_text, auto_fix=True),
        TEMPLATE_LINE,
        "not an image that can be read",
    ),
]


@pytest.mark.parametrize(
    ("build", "line", "field"),
    [pytest.param(b, ln, f, id=i) for i, b, ln, f in MANIFEST_CASES],
)
def test_bad_manifest_is_refused_in_one_line(
    job: Job,
    capsys: pytest.CaptureFixture[str],
    build: Callable[[Path], bytes],
    line: int | None,
    field: str,
) -> None:
    data = build(job.root)
    job.manifest.write_bytes(data)
    if line == LAST:
        line = len(data.splitlines())
    expect_refused(job, capsys, file=job.manifest, line=line, field=field)


def test_the_template_field_is_named(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    job.manifest.write_bytes(_template(_gif)(job.root))
    expect_refused(
        job, capsys, file=job.manifest, line=5, field="operations[0].params.image_template: "
    )


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_manifest_that_is_not_a_file(
    job: Job, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    target = job.root / "special.yaml"
    if kind == "fifo":
        os.mkfifo(target)  # opening it for reading would block forever
    elif kind == "folder":
        target.mkdir()
    else:
        os.symlink("/dev/zero", target)  # endless bytes
    expect_refused(
        job,
        capsys,
        file=target,
        line=None,
        field="folder" if kind == "folder" else "regular",
        manifest=target,
    )


def test_output_on_a_place_not_writable(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits; needs an unprivileged user")
    locked = job.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        job.manifest.write_text(GOOD_MANIFEST.replace("output: out", "output: locked/out"))
        expect_refused(job, capsys, file=job.manifest, line=8, field="not writable")
    finally:
        locked.chmod(0o755)


def test_output_on_a_read_only_mount(job: Job) -> None:
    # A real read-only file system: a tmpfs mounted ro in a private mount namespace
    # (nothing outside this one process sees it), then `pipeline validate` inside it.
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare")
    ro = job.root / "ro"
    ro.mkdir()
    job.manifest.write_text(GOOD_MANIFEST.replace("output: out", "output: ro/out"))
    script = 'mount -t tmpfs -o ro tmpfs "$1" || exit 99; shift; exec "$@"'
    done = subprocess.run(
        [
            unshare,
            "-m",
            "sh",
            "-c",
            script,
            "sh",
            str(ro),
            sys.executable,
            "-m",
            "pipeline",
            "validate",
            str(job.manifest),
            "--config",
            str(job.config),
        ],
        capture_output=True,
        check=False,
        timeout=30,
    )
    if done.returncode == 99 or b"Operation not permitted" in done.stderr:
        pytest.skip("no permission to make a private mount namespace here")
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.splitlines() == [
        f"pipeline: error: {job.manifest}:8: output: {ro / 'out'} is on a read-only file "
        f"system ({ro}, where it would be made); choose a folder you can write to"
    ]


# --------------------------------------------------------------------- bad configs

CONFIG_CASES: list[tuple[str, str, int | None, str]] = [
    (
        "api-key-env-empty",
        "providers: {ailab: {api_key_env: ''}}",
        1,
        "providers.ailab.api_key_env: is empty",
    ),
    (
        "api-key-env-spaces",
        "providers: {ailab: {api_key_env: 'MY AILAB KEY'}}",
        1,
        "providers.ailab.api_key_env: must be the NAME",
    ),
    (
        "api-key-env-lowercase",
        "providers: {ailab: {api_key_env: 'ailab key!'}}",
        1,
        "providers.ailab.api_key_env: must be the NAME",
    ),
    (
        "api-key-env-number",
        "providers: {perfectcorp: {api_key_env: 12}}",
        1,
        "providers.perfectcorp.api_key_env: input should be a valid string",
    ),
    (
        "base-url-ftp",
        "providers: {ailab: {base_url: 'ftp://files.example.com'}}",
        1,
        "providers.ailab.base_url: must start with https://",
    ),
    (
        "base-url-file",
        "providers: {ailab: {base_url: 'file:///etc/passwd'}}",
        1,
        "providers.ailab.base_url: must start with https://",
    ),
    (
        "base-url-no-host",
        "providers: {ailab: {base_url: 'https://'}}",
        1,
        "providers.ailab.base_url: has no host",
    ),
    (
        "base-url-no-scheme",
        "providers: {ailab: {base_url: 'www.ailabapi.com'}}",
        1,
        "providers.ailab.base_url: must start with https://",
    ),
    (
        "base-url-credentials",
        "providers: {ailab: {base_url: 'https://u:pw@example.com'}}",
        1,
        "providers.ailab.base_url: must not contain a user name or password",
    ),
    (
        "base-url-query",
        "providers: {ailab: {base_url: 'https://example.com/?k=1'}}",
        1,
        "providers.ailab.base_url: must not have a query",
    ),
    (
        "base-url-fragment",
        "providers: {ailab: {base_url: 'https://example.com/#x'}}",
        1,
        "providers.ailab.base_url: must not have a query",
    ),
    (
        "base-url-bad-port",
        "providers: {ailab: {base_url: 'https://example.com:99999'}}",
        1,
        "providers.ailab.base_url: is not a valid URL",
    ),
    (
        "upload-path-a-url",
        "providers: {perfectcorp: {upload_path: 'https://x.example/u'}}",
        1,
        "providers.perfectcorp.upload_path: must be a path",
    ),
    (
        "task-deadline-zero",
        "providers: {ailab: {task_deadline_seconds: 0}}",
        1,
        "providers.ailab.task_deadline_seconds: input should be greater than 0",
    ),
    (
        "task-deadline-infinite",
        "providers: {ailab: {task_deadline_seconds: .inf}}",
        1,
        "providers.ailab.task_deadline_seconds: input should be a finite number",
    ),
    (
        "polling-window-zero",
        "providers: {perfectcorp: {polling_window_seconds: 0}}",
        1,
        "providers.perfectcorp.polling_window_seconds: input should be greater than 0",
    ),
    (
        "polling-window-negative",
        "providers: {perfectcorp: {polling_window_seconds: -3}}",
        1,
        "providers.perfectcorp.polling_window_seconds",
    ),
    (
        "poll-interval-huge",
        "providers: {ailab: {poll_interval_seconds: 1.0e+300}}",
        1,
        "providers.ailab.poll_interval_seconds: input should be less than or equal to 86400",
    ),
    (
        "retry-after-max-negative",
        "retry: {retry_after_max_seconds: -1}",
        1,
        "retry.retry_after_max_seconds",
    ),
    (
        "retry-after-max-text",
        "retry: {retry_after_max_seconds: forever}",
        1,
        "retry.retry_after_max_seconds: input should be a valid number",
    ),
    (
        "backoff-inverted",
        "retry: {backoff_initial_seconds: 90, backoff_max_seconds: 9}",
        1,
        "retry: backoff_initial_seconds (90) is larger than backoff_max_seconds (9)",
    ),
    (
        "allow-hosts-a-string",
        "network: {allow_result_hosts: '127.0.0.1:9000'}",
        1,
        "network.allow_result_hosts: expected a list",
    ),
    (
        "allow-hosts-no-port",
        "network: {allow_result_hosts: ['storage.internal']}",
        1,
        "network.allow_result_hosts: 'storage.internal' is not 'host:port'",
    ),
    (
        "allow-hosts-port-out-of-range",
        "network: {allow_result_hosts: ['h:70000']}",
        1,
        "port must be 1-65535",
    ),
    (
        "allow-hosts-link-local",
        "network:\n  allow_result_hosts:\n    - '127.0.0.1:9000'\n    - '[fe80::1]:80'",
        4,
        "network.allow_result_hosts[1]: '[fe80::1]:80': link-local addresses",
    ),
    (
        "allow-hosts-number",
        "network: {allow_result_hosts: [9000]}",
        1,
        "network.allow_result_hosts: each entry must be a string",
    ),
    ("max-download-zero", "network: {max_download_bytes: 0}", 1, "network.max_download_bytes"),
    (
        "max-response-text",
        "network: {max_response_bytes: lots}",
        1,
        "network.max_response_bytes: input should be a valid integer",
    ),
    ("max-pixels-negative", "network: {max_result_pixels: -1}", 1, "network.max_result_pixels"),
    ("reports-keep-zero", "reporting: {reports_keep: 0}", 1, "reporting.reports_keep"),
    (
        "unreachable-after-zero",
        "network: {unreachable_after_requests: 0}",
        1,
        "network.unreachable_after_requests",
    ),
    (
        "progress-interval-zero",
        "reporting: {progress_interval_seconds: 0}",
        1,
        "reporting.progress_interval_seconds",
    ),
    (
        "rate-limit-half-a-window",
        "providers: {ailab: {rate_limit: {requests: 100}}}",
        1,
        "providers.ailab.rate_limit: give requests and per_seconds together",
    ),
    (
        "rate-limit-a-list",
        "providers: {perfectcorp: {rate_limit: [250, 300]}}",
        1,
        "providers.perfectcorp.rate_limit: expected a mapping",
    ),
    (
        "unknown-provider",
        "providers: {openai: {base_url: 'https://x'}}",
        1,
        "providers.openai: not an allowed key",
    ),
    ("unknown-section", "retries: {backoff_max_seconds: 5}", 1, "retries: unknown key"),
    ("source-is-not-a-setting", "source: /etc/passwd", 1, "source: unknown key"),
    ("duplicate-section", "retry: {}\ntimeouts: {}\nretry: {}", 3, "retry: duplicate key"),
    ("scalar-config", "just text", 1, "(top level)"),
    ("tab-indented", "retry:\n\tbackoff_max_seconds: 5", 2, "tabs"),
    ("nested-deep", "retry: " + "[" * 10_000 + "]" * 10_000, 1, "retry[0][0]"),
    ("self-anchor", "retry: &r {x: *r}", 1, "retry.x"),
]


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [pytest.param(t, ln, f, id=i) for i, t, ln, f in CONFIG_CASES],
)
def test_bad_config_is_refused_in_one_line(
    job: Job, capsys: pytest.CaptureFixture[str], text: str, line: int | None, field: str
) -> None:
    job.config.write_text(text + "\n")
    expect_refused(job, capsys, file=job.config, line=line, field=field)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(b"retry: {}\n\x00\n", "U+0000 (NUL)", id="nul-byte"),
        pytest.param(b"retry: {backoff_max_seconds: 5}\n# caf\xe9\n", "not UTF-8", id="utf8"),
        pytest.param("retry: {}\n".encode("utf-16"), "UTF-16", id="utf16"),
        pytest.param(b"retry: {}\n" + b"#" * HUGE, "larger than 1 MB", id="huge"),
        pytest.param(
            _alias_bomb().replace(GOOD_MANIFEST.encode(), b""), "alias bomb", id="alias-bomb"
        ),
    ],
)
def test_hostile_config_bytes(
    job: Job, capsys: pytest.CaptureFixture[str], data: bytes, field: str
) -> None:
    job.config.write_bytes(data)
    expect_refused(job, capsys, file=job.config, line=None, field=field)


def test_config_that_is_a_fifo(job: Job, capsys: pytest.CaptureFixture[str]) -> None:
    job.config.unlink()
    os.mkfifo(job.config)
    expect_refused(job, capsys, file=job.config, line=None, field="(a FIFO)")


def test_secrets_in_a_bad_config_are_not_echoed(
    job: Job, capsys: pytest.CaptureFixture[str]
) -> None:
    job.config.write_text(
        "providers:\n"
        "  ailab: {api_key_env: 'sk-live-7f3a9c'}\n"
        "  perfectcorp: {base_url: 'https://me:hunter2@yce.example'}\n"
    )
    for words in MODES.values():
        assert main([words[0], str(job.manifest), "--config", str(job.config), *words[1:]]) == 2
        _, err = capsys.readouterr()
        assert "sk-live-7f3a9c" not in err and "hunter2" not in err
        assert f"{job.config}:2: providers.ailab.api_key_env: must be the NAME" in err


# ------------------------------------------------------ bombs: bounded time and memory


def test_alias_bomb_is_refused_with_little_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_bytes(_alias_bomb())
    assert len(_alias_bomb()) < 1024
    tracemalloc.start()
    try:
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024  # the expanded tree would be gigabytes
    assert f"more than {MAX_ALIAS_EXPANSION} values (an alias bomb?)" in str(info.value)


def test_ordinary_anchors_still_work(tmp_path: Path) -> None:
    make_portrait(tmp_path / "template.jpg", seed=4)
    path = tmp_path / "job.yaml"
    path.write_text(
        "inputs: ['*.jpg']\n"
        "operations:\n"
        "  - op: ailab/face-beauty-pro\n"
        "    params: &soft {smoothing: 70, whitening: [10, 20]}\n"
        "  - op: ailab/face-beauty-pro\n"
        "    params: {<<: *soft, filter_type: sakura}\n"
        "output: out\n"
    )
    manifest = load_manifest(path)
    assert [v.label for v in manifest.variants] == [
        "smoothing=70,whitening=10",
        "smoothing=70,whitening=20",
        "filter_type=sakura,smoothing=70,whitening=10",
        "filter_type=sakura,smoothing=70,whitening=20",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["validate"], id="validate"),
        pytest.param(["run", "--dry-run"], id="dry-run"),
    ],
)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"inputs: " + b"[" * 10_000 + b"]" * 10_000 + b"\n", id="deep"),
        pytest.param(_alias_bomb(), id="alias-bomb"),
        pytest.param(b"inputs: ['a']\x00\n", id="nul"),
        pytest.param(b"\xff\xfei\x00n\x00", id="utf16"),
    ],
)
def test_real_process_exits_2_without_traceback(
    tmp_path: Path, argv: list[str], data: bytes
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", argv[0], str(manifest), *argv[1:]],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        timeout=30,
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert re.match(rf"pipeline: error: {re.escape(str(manifest))}:\d+: ", err), err
    assert done.stdout == b""


# --------------------------------------------- property: no input escapes as a crash

_hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        [
            "/proc/self/x",
            "../../etc",
            "ftp://x",
            "https://u:p@h",
            "template.jpg",
            "ailab/face-swap",
            "*.jpg",
            "big_grin",
            "",
        ]
    ),
)
_keys = st.sampled_from(
    [
        "inputs",
        "operations",
        "output",
        "op",
        "params",
        "image_template",
        "concurrency",
        "max_credits",
        "max_failure_ratio",
        "providers",
        "ailab",
        "perfectcorp",
        "base_url",
        "api_key_env",
        "rate_limit",
        "network",
        "allow_result_hosts",
        "reporting",
        "retry",
    ]
) | st.text(max_size=8)
_documents = st.recursive(
    _hostile_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=25,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(doc=_documents)
def test_any_yaml_document_loads_or_is_refused_cleanly(tmp_path: Path, doc: object) -> None:
    if not (tmp_path / "template.jpg").exists():
        make_portrait(tmp_path / "template.jpg", seed=5)
    path = tmp_path / "doc.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    for load, error in ((load_manifest, ManifestError), (load_config, ConfigError)):
        try:
            load(path)
        except error as exc:
            message = str(exc)
            assert message.startswith(str(path)), message
            assert all(line.startswith(str(path)) for line in message.splitlines())


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=300))
def test_any_bytes_load_or_are_refused_cleanly(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "doc.yaml"
    path.write_bytes(data)
    for load, error in ((load_manifest, ManifestError), (load_config, ConfigError)):
        try:
            load(path)
        except error as exc:
            assert str(exc).startswith(str(path))
