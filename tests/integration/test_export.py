"""``pipeline export``: a real output folder (run against the emulator) as a dataset.

The imagefolder export is loaded with Hugging Face ``datasets`` exactly as a user
would; the webdataset shards are read back with ``tarfile``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.cli import main
from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.export import export_dataset
from pipeline.manifest import load_manifest
from tests.conftest import fast_config, make_portrait

# datasets must never reach for the Hub in a test; it reads these at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytestmark = pytest.mark.timeout(90)

OPS: list[dict[str, Any]] = [
    {"op": "ailab/emotion-editor", "params": {"service_choice": ["big_grin", "sad"]}},
    {"op": "ailab/face-beauty-pro", "params": {"smoothing": 70, "filter_type": "sakura"}},
    {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
    {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
]

# What each variant must read as, written by hand from OPS (not from the code under test).
PARAM_COLUMNS = [
    "enlarge_eye", "expression_type", "filter_type", "remove_eyebrow", "service_choice",
    "shrink_face", "smoothing", "task_type", "thinface", "whitening",
]  # fmt: skip
EXPECTED_PARAMS: dict[str, dict[str, Any]] = {
    "service_choice=big_grin": {"service_choice": "big_grin"},
    "service_choice=sad": {"service_choice": "sad"},
    "filter_type=sakura,smoothing=70": {"filter_type": "sakura", "smoothing": 70},
    "image_template=template": {},
    "expression_type=closed_mouth_smile": {"expression_type": "closed_mouth_smile"},
}
COLUMNS = [
    "file_name", "input_file_name", "key", "operation", "variant", *PARAM_COLUMNS,
    "template", "input_rel", "output_rel",
]  # fmt: skip
TINY = "in/tiny.jpg"  # 40x40: below face-beauty-pro's 48 px minimum, so that item fails


async def _output_folder(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    *,
    tiny: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    portraits(3)
    if tiny:
        make_portrait(tmp_path / TINY, seed=4242, size=(40, 40))
    manifest = load_manifest(write_manifest(OPS))
    await run_job(manifest, fast_config(emulator.base_url), RunOptions(quiet=True))
    out = manifest.output
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return out, lines


def _output_rel(line: dict[str, Any], out: Path) -> str:
    return str(line.get("output_rel") or Path(line["output"]).relative_to(out.resolve()))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the run before it printed
    code = main(["export", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _metadata(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]


def _load_imagefolder(folder: Path, cache: Path) -> Any:
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache))


async def test_imagefolder_loads_with_datasets_as_labelled_before_after_pairs(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import datasets

    out, lines = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    assert len(lines) == 15 and {x["status"] for x in lines} == {"succeeded"}
    dest = tmp_path / "export"
    code, stdout, _ = _cli(capsys, str(out), "--format", "imagefolder", "--to", str(dest))
    assert code == 0
    assert stdout == (
        f"exported 15 items as imagefolder to {dest}; left out 0 failed, 0 duplicates, "
        f"0 missing on disk, 0 unfinished\n"
    )
    assert all(list(row) == COLUMNS for row in _metadata(dest))

    ds = _load_imagefolder(dest, tmp_path / "hf-cache")
    assert list(ds) == ["train"]
    train = ds["train"]
    assert train.num_rows == 15
    assert train.column_names == ["image", "input", *COLUMNS[2:]]
    assert isinstance(train.features["image"], datasets.Image)
    assert isinstance(train.features["input"], datasets.Image)
    by_key = {x["key"]: x for x in lines}
    for row in train:
        line = by_key[row["key"]]
        assert row["operation"] == line["operation"]
        assert row["variant"] == line["variant"]
        expected = {name: None for name in PARAM_COLUMNS} | EXPECTED_PARAMS[line["variant"]]
        assert {name: row[name] for name in PARAM_COLUMNS} == expected
        assert row["template"] == line.get("template")
        assert row["input_rel"] == line["input_rel"]
        assert row["output_rel"] == _output_rel(line, out)
        # Before and after: real images, the input as it was, the result as paid for.
        assert isinstance(row["image"], Image.Image) and isinstance(row["input"], Image.Image)
        with Image.open(line["input"]) as original:
            assert row["input"].size == original.size
        with Image.open(out / row["output_rel"]) as result:
            assert row["image"].size == result.size
    raw = train.cast_column("image", datasets.Image(decode=False)).cast_column(
        "input", datasets.Image(decode=False)
    )
    for row in raw:
        line = by_key[row["key"]]
        assert Path(row["image"]["path"]).read_bytes() == (out / row["output_rel"]).read_bytes()
        assert Path(row["input"]["path"]).read_bytes() == Path(line["input"]).read_bytes()
    # One copy per input, shared by its five variants; copies, not links.
    assert len(list((dest / "inputs").iterdir())) == 3
    result_file = dest / _metadata(dest)[0]["file_name"]
    assert result_file.stat().st_nlink == 1


async def test_failed_duplicate_and_missing_items_are_left_out_and_counted(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, lines = await _output_folder(tmp_path, emulator, portraits, write_manifest, tiny=True)
    failed = [x for x in lines if x["status"] == "failed"]
    assert [x["input_rel"] for x in failed] == ["in/tiny.jpg"]
    assert failed[0]["operation"] == "ailab/face-beauty-pro"
    done = [x for x in lines if x["status"] == "succeeded"]
    assert len(done) == 19
    # A result deleted by hand since the run, and an input the results name as a
    # duplicate of another (the shape results.jsonl documents for duplicate_of).
    gone = done[0]
    Path(gone["output"]).unlink()
    duplicate = dict(done[1], key="d" * 64, input=str(tmp_path / "in" / "copy.jpg"))
    duplicate["duplicate_of"] = done[1]["input"]
    with (out / "results.jsonl").open("a") as handle:
        handle.write(json.dumps(duplicate) + "\n")

    dest = tmp_path / "export"
    code, stdout, stderr = _cli(capsys, str(out), "--format", "imagefolder", "--to", str(dest))
    assert code == 0
    assert stdout == (
        f"exported 18 items as imagefolder to {dest}; left out 1 failed, 1 duplicates, "
        f"1 missing on disk, 0 unfinished\n"
    )
    assert stderr.count("\n") == 1 and gone["output"] in stderr and "missing on disk" in stderr
    rows = _metadata(dest)
    assert sorted(r["key"] for r in rows) == sorted(x["key"] for x in done[1:])
    ds = _load_imagefolder(dest, tmp_path / "hf-cache")
    assert ds["train"].num_rows == 18

    code, stdout, _ = _cli(capsys, str(out), "--format", "webdataset", "--to", str(tmp_path / "w"))
    assert code == 0
    assert stdout == (
        f"exported 18 items as webdataset to {tmp_path / 'w'}/shard-{{000000..000000}}.tar; "
        f"left out 1 failed, 1 duplicates, 1 missing on disk, 0 unfinished\n"
    )


async def test_webdataset_shards_hold_result_input_and_json_per_dotless_key(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, lines = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    dest = tmp_path / "shards"
    code, stdout, _ = _cli(
        capsys, str(out), "--format", "webdataset", "--to", str(dest), "--shard-size", "4"
    )
    assert code == 0
    assert stdout == (
        f"exported 15 items as webdataset to {dest}/shard-{{000000..000003}}.tar; left out "
        f"0 failed, 0 duplicates, 0 missing on disk, 0 unfinished\n"
    )
    shards = sorted(p.name for p in dest.iterdir())
    assert shards == [f"shard-{i:06d}.tar" for i in range(4)]
    by_key = {x["key"]: x for x in lines}
    seen: list[str] = []
    per_shard = []
    for shard in shards:
        with tarfile.open(dest / shard) as tar:
            members = tar.getmembers()
            samples: dict[str, dict[str, bytes]] = {}
            for m in members:
                assert m.isfile() and "/" not in m.name
                key, field = m.name.split(".", 1)
                handle = tar.extractfile(m)
                assert handle is not None
                samples.setdefault(key, {})[field] = handle.read()
        per_shard.append(len(samples))
        for key, sample in samples.items():
            assert re.fullmatch(r"[0-9a-f]{64}", key)
            line = by_key[key]
            ext = Path(line["input"]).suffix
            assert set(sample) == {"result.jpg", f"input{ext}", "json"}
            assert sample["result.jpg"] == Path(line["output"]).read_bytes()
            assert sample[f"input{ext}"] == Path(line["input"]).read_bytes()
            meta = json.loads(sample["json"])
            assert list(meta) == COLUMNS[2:]
            assert meta["key"] == key and meta["variant"] == line["variant"]
            expected = {name: None for name in PARAM_COLUMNS} | EXPECTED_PARAMS[line["variant"]]
            assert {name: meta[name] for name in PARAM_COLUMNS} == expected
            seen.append(key)
    assert per_shard == [4, 4, 4, 3]
    assert sorted(seen) == sorted(by_key)

    # A smaller export over it with --force leaves no stale shard behind.
    code, stdout, _ = _cli(capsys, str(out), "--format", "webdataset", "--to", str(dest), "--force")
    assert code == 0 and sorted(p.name for p in dest.iterdir()) == ["shard-000000.tar"]
    with tarfile.open(dest / "shard-000000.tar") as tar:
        assert len(tar.getnames()) == 45


# webdataset's tar iterator leaves its shard files for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_webdataset_reads_the_shards(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    import webdataset as wds  # declared in the test extra: never skipped

    out, lines = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    export_dataset(out, "webdataset", tmp_path / "w", shard_size=10)
    urls = [str(p) for p in sorted((tmp_path / "w").iterdir())]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(keys) == sorted(x["key"] for x in lines)


async def test_refusals_are_one_line_with_exit_2(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")

    def refused(*argv: str) -> str:
        code, stdout, stderr = _cli(capsys, *argv)
        assert (code, stdout) == (2, "")
        assert stderr.count("\n") == 1 and stderr.startswith("pipeline: error: ")
        return stderr

    assert "not empty" in refused(str(out), "--format", "imagefolder", "--to", str(busy))
    assert sorted(p.name for p in busy.iterdir()) == ["mine.txt"]
    assert "inside the output folder" in refused(
        str(out), "--format", "imagefolder", "--to", str(out / "export")
    )
    assert not (out / "export").exists()
    assert "contains the output folder" in refused(
        str(out), "--format", "webdataset", "--to", str(tmp_path), "--force"
    )
    assert "--link works with --format imagefolder only" in refused(
        str(out), "--format", "webdataset", "--to", str(tmp_path / "w"), "--link"
    )
    assert "--shard-size 0" in refused(
        str(out), "--format", "webdataset", "--to", str(tmp_path / "w"), "--shard-size", "0"
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    message = refused(str(bare), "--format", "imagefolder", "--to", str(tmp_path / "e"))
    assert "results.jsonl: not found" in message and f"pipeline report {bare}" in message
    assert "no such output folder" in refused(
        str(tmp_path / "nowhere"), "--format", "imagefolder", "--to", str(tmp_path / "e")
    )
    (out / "results.jsonl").write_text('{"key": "a", "status": "succeeded"}\nnot json\n')
    message = refused(str(out), "--format", "imagefolder", "--to", str(tmp_path / "e"))
    assert "results.jsonl:2: not a results line" in message
    assert not (tmp_path / "e").exists()

    # --force writes into the busy folder and keeps what it does not replace.
    (out / "results.jsonl").unlink()
    main(["report", str(out)])
    capsys.readouterr()
    code, stdout, _ = _cli(
        capsys, str(out), "--format", "imagefolder", "--to", str(busy), "--force"
    )
    assert code == 0 and stdout.startswith("exported 15 items")
    assert (busy / "mine.txt").read_text() == "keep me" and len(_metadata(busy)) == 15


async def test_link_hard_links_and_a_later_copy_never_writes_through(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    dest = tmp_path / "linked"
    code, stdout, stderr = _cli(
        capsys, str(out), "--format", "imagefolder", "--to", str(dest), "--link"
    )
    assert (code, stderr) == (0, "") and "copied" not in stdout
    rows = _metadata(dest)
    for row in rows:
        assert (dest / row["file_name"]).samefile(out / row["output_rel"])
    before = {row["output_rel"]: (out / row["output_rel"]).read_bytes() for row in rows}
    # Re-export by copying over the links: each becomes its own file again, and the
    # paid results are untouched.
    code, _, _ = _cli(capsys, str(out), "--format", "imagefolder", "--to", str(dest), "--force")
    assert code == 0
    for row in _metadata(dest):
        assert not (dest / row["file_name"]).samefile(out / row["output_rel"])
        assert (out / row["output_rel"]).stat().st_nlink == 1
        assert (out / row["output_rel"]).read_bytes() == before[row["output_rel"]]


async def test_link_across_filesystems_copies_and_says_so(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp folder")
    out, _ = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    dest = Path(tempfile.mkdtemp(dir=shm)) / "export"
    try:
        code, stdout, stderr = _cli(
            capsys, str(out), "--format", "imagefolder", "--to", str(dest), "--link"
        )
        assert code == 0
        assert stdout.endswith("; copied, not linked (another filesystem)\n")
        assert stderr.count("\n") == 1 and "cannot hard-link" in stderr and "copying" in stderr
        rows = _metadata(dest)
        assert len(rows) == 15
        for row in rows:
            exported = dest / row["file_name"]
            assert exported.read_bytes() == (out / row["output_rel"]).read_bytes()
    finally:
        shutil.rmtree(dest.parent)


async def test_a_moved_output_folder_still_exports(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, lines = await _output_folder(tmp_path, emulator, portraits, write_manifest)
    moved = tmp_path / "moved-out"
    out.rename(moved)
    results = moved / "results.jsonl"
    # Older results.jsonl: absolute paths only (the report.json still names the old
    # folder); newer: output_rel, params_readable and template as well.
    old_style = [{k: v for k, v in x.items() if k not in {"output_rel", "params_readable", "template"}} for x in lines]  # fmt: skip
    results.write_text("".join(json.dumps(x) + "\n" for x in old_style))
    code, stdout, _ = _cli(
        capsys, str(moved), "--format", "imagefolder", "--to", str(tmp_path / "a")
    )
    assert code == 0 and stdout.startswith("exported 15 items")
    (moved / "report.json").unlink()
    code, stdout, _ = _cli(
        capsys, str(moved), "--format", "imagefolder", "--to", str(tmp_path / "b")
    )
    assert code == 0 and stdout.startswith("exported 0 items") and "15 missing on disk" in stdout

    new_style = [
        dict(
            x,
            output_rel=_output_rel(x, out),
            output="/nowhere/" + Path(x["output"]).name,
            params_readable=EXPECTED_PARAMS[x["variant"]],
            template="template.jpg" if x["operation"] == "ailab/face-swap" else None,
        )
        for x in old_style
    ]
    results.write_text("".join(json.dumps(x) + "\n" for x in new_style))
    code, stdout, _ = _cli(
        capsys, str(moved), "--format", "imagefolder", "--to", str(tmp_path / "c")
    )
    assert code == 0 and stdout.startswith("exported 15 items")
    a = {r["key"]: r for r in _metadata(tmp_path / "a")}
    for row in _metadata(tmp_path / "c"):
        swap = row["operation"] == "ailab/face-swap"
        assert row["template"] == ("template.jpg" if swap else None)
        assert dict(row, template=None) == dict(a[row["key"]], template=None)


# ------------------------------------------------------------------ column types


_VALUES = st.one_of(st.none(), st.integers(0, 100))
_ROWS = st.lists(
    st.tuples(
        st.sampled_from(["ailab/emotion-editor", "ailab/face-beauty-pro", "ailab/face-swap"]),
        st.dictionaries(st.sampled_from(["smoothing", "whitening", "thinface"]), _VALUES),
        st.sampled_from(["ok", "failed", "dup"]),
        st.booleans(),  # template set
    ),
    max_size=25,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=_ROWS)
def test_metadata_columns_are_uniform_and_typed_by_the_first_rows(
    tmp_path: Path, rows: list[tuple[str, dict[str, int | None], str, bool]]
) -> None:
    """Whatever the mix of operations, nulls and left-out items: every row has the same
    columns, each column holds one type, and each of the k columns ever set is set in
    one of the first k rows (``datasets`` types a column from the first 10 MB)."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    out = work / "out"
    make_portrait(out / "r.jpg", seed=1)
    source = make_portrait(work / "in.jpg", seed=2)
    lines = []
    for i, (op, params, fate, templated) in enumerate(rows):
        lines.append(
            {
                "key": f"{i:064x}",
                "input": str(source),
                "input_rel": "in.jpg",
                "operation": op,
                "variant": "v",
                "params": params,
                "status": "failed" if fate == "failed" else "succeeded",
                "output": str(out / "r.jpg"),
                "output_rel": "r.jpg",
                "template": "t.jpg" if templated else None,
                "duplicate_of": "other.jpg" if fate == "dup" else None,
            }
        )
    (out / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = export_dataset(out, "imagefolder", work / "export", link=True)
    written = _metadata(work / "export")
    kept = [x for x in lines if x["status"] == "succeeded" and not x["duplicate_of"]]
    assert summary.exported == len(written) == len(kept)
    assert sorted(r["key"] for r in written) == sorted(x["key"] for x in kept)
    if not written:
        return
    columns = list(written[0])
    assert all(list(r) == columns for r in written)
    nullable = [c for c in columns if c not in {"file_name", "input_file_name", "key", "operation", "variant", "input_rel", "output_rel"}]  # fmt: skip
    ever_set = [c for c in nullable if any(r[c] is not None for r in written)]
    for column in nullable:
        values = [r[column] for r in written]
        assert len({type(v) for v in values if v is not None}) <= 1
        if column in ever_set:
            assert any(v is not None for v in values[: len(ever_set)]), column
