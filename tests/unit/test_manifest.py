"""Manifest loading: validation messages (file, line, field), expansion, labels."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import ManifestError, UsageError
from pipeline.manifest import Manifest, Variant, describe_plan, load_manifest
from pipeline.operations import OPERATIONS
from tests.conftest import make_portrait


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, name: str = "job.yaml") -> Manifest:
    return load_manifest(write(tmp_path, text, name))


def error_of(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert "https://" not in message  # no pydantic doc links
    return message


def ops_manifest(params: str, op: str = "ailab/face-beauty-pro") -> str:
    """A minimal manifest whose only operation is ``op`` with ``params`` on line 5."""
    return f"""
        inputs: "photos/*.jpg"
        operations:
          - op: {op}
            params:
              {params}
        output: out
        """


# ------------------------------------------------------------------------ happy path


def test_demo_manifest_loads_with_defaults_and_variants(tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    make_portrait(tmp_path / "samples" / "template.jpg", seed=1)
    m = load(
        tmp_path,
        """
        name: demo
        inputs: ["samples/**/*.jpg", "samples/**/*.png"]
        operations:
          - op: ailab/emotion-editor
            params: {service_choice: [big_grin, cool_pose]}
          - op: ailab/face-beauty-pro
            params: {smoothing: 70, whitening: 40, filter_type: sakura}
          - op: ailab/face-swap
            params: {image_template: samples/template.jpg}
          - op: perfectcorp/ai-smile
            params: {expression_type: closed_mouth_smile}
        output: ../out/demo
        emulator: true
        """,
    )
    assert m.name == "demo"
    assert m.path == tmp_path / "job.yaml"
    assert m.base_dir == tmp_path
    assert m.inputs == ("samples/**/*.jpg", "samples/**/*.png")
    assert m.output == tmp_path.parent / "out" / "demo"
    assert (m.concurrency, m.max_attempts, m.emulator, m.auto_fix) == (8, 5, True, False)
    assert m.max_credits == {}
    assert [(v.operation.name, v.label) for v in m.variants] == [
        ("ailab/emotion-editor", "service_choice=big_grin"),
        ("ailab/emotion-editor", "service_choice=cool_pose"),
        ("ailab/face-beauty-pro", "filter_type=sakura,smoothing=70,whitening=40"),
        ("ailab/face-swap", "image_template=template"),
        ("perfectcorp/ai-smile", "expression_type=closed_mouth_smile"),
    ]
    assert m.variants[0].params == {"service_choice": 12}
    assert m.variants[2].params == {"smoothing": 70, "whitening": 40, "filter_type": 10}
    swap = m.variants[3]
    assert swap.params == {}
    assert swap.files == {"image_template": tmp_path / "samples" / "template.jpg"}
    assert m.variants[4].params == {"expression_type": "closed_mouth_smile"}
    assert all(v.operation is OPERATIONS[v.operation.name] for v in m.variants)


def test_name_defaults_to_file_stem_and_single_input_string(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        """
        inputs: "*.jpg"
        operations: [{op: ailab/face-beauty-pro}]
        output: out
        concurrency: 3
        max_attempts: 1
        auto_fix: yes
        """,
        name="nightly-run.yaml",
    )
    assert m.name == "nightly-run"
    assert m.inputs == ("*.jpg",)
    assert (m.concurrency, m.max_attempts, m.auto_fix) == (3, 1, True)
    assert [v.label for v in m.variants] == ["default"]
    assert m.variants[0].params == {}


def test_defaults_are_not_filled_in(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest("{smoothing: 10}"))
    assert m.variants[0].params == {"smoothing": 10}  # no whitening=50, no task_type


def test_params_null_means_no_params(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
            params:
        output: out
        """,
    )
    assert m.variants[0].label == "default"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("100", {"ailab": 100.0, "perfectcorp": 100.0}),
        ("2.5", {"ailab": 2.5, "perfectcorp": 2.5}),
        ("{ailab: 500}", {"ailab": 500.0}),
        ("{ailab: 0, perfectcorp: 20}", {"ailab": 0.0, "perfectcorp": 20.0}),
    ],
)
def test_max_credits_number_or_mapping(
    tmp_path: Path, given: str, expected: dict[str, float]
) -> None:
    m = load(
        tmp_path,
        f"""
        inputs: "*.jpg"
        operations: [{{op: ailab/face-beauty-pro}}]
        output: out
        max_credits: {given}
        """,
    )
    assert m.max_credits == expected


def test_output_relative_to_manifest_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.chdir(tmp_path)
    m = load_manifest(
        write(jobs, 'inputs: "*.jpg"\noperations: [{op: ailab/face-beauty-pro}]\noutput: res\n')
    )
    assert m.output == jobs / "res"
    assert m.output.is_absolute() and m.path.is_absolute()


# ---------------------------------------------------------------- enums and codes


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("big_grin", 12),
        ("Big Grin", 12),
        ("BIG-GRIN", 12),
        ("12", 12),
        ("100", 100),
        ("opening_eyes", 100),
        ("16", 16),
    ],
)
def test_service_choice_names_and_codes(tmp_path: Path, value: str, code: int) -> None:
    m = load(tmp_path, ops_manifest(f"service_choice: {value}", "ailab/emotion-editor"))
    assert m.variants[0].params == {"service_choice": code}


def test_numeric_string_code_is_accepted(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest('filter_type: "34"'))
    assert m.variants[0].params == {"filter_type": 34}
    assert m.variants[0].label == "filter_type=pink"


def test_filter_names(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest("filter_type: [Black and White, misty-rain, LOMO]"))
    assert [v.params["filter_type"] for v in m.variants] == [1, 35, 21]
    assert [v.label for v in m.variants] == [
        "filter_type=black_and_white",
        "filter_type=misty_rain",
        "filter_type=lomo",
    ]


def test_ai_smile_codes_are_strings_and_aliases_dedupe(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        ops_manifest(
            "expression_type: [teeth, smile_with_teeth_visible, closed mouth]",
            "perfectcorp/ai-smile",
        ),
    )
    assert [v.params for v in m.variants] == [
        {"expression_type": "smile_with_teeth_visible"},
        {"expression_type": "closed_mouth_smile"},
    ]
    assert [v.label for v in m.variants] == [
        "expression_type=smile_with_teeth_visible",
        "expression_type=closed_mouth_smile",
    ]


def test_task_type_choice(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest("{task_type: SYNC, smoothing: 5}"))
    assert m.variants[0].params == {"task_type": "sync", "smoothing": 5}
    assert m.variants[0].label == "smoothing=5,task_type=sync"


def test_unknown_enum_name_names_line_field_and_suggests(tmp_path: Path) -> None:
    text = """
        inputs: "*.jpg"
        operations:
          - op: ailab/emotion-editor
            params: {service_choice: big_grin}
          - op: ailab/face-beauty-pro
            params:
              smoothing: 70
              filter_type: sakuraa
        output: out
        """
    msg = error_of(tmp_path, text, "x.yaml")
    assert msg.startswith(f"{tmp_path / 'x.yaml'}:8: operations[1].params.filter_type: ")
    assert "unknown value 'sakuraa'" in msg
    assert "use a code 1-35 or a name such as sakura" in msg
    assert "\n" not in msg


def test_unknown_code_lists_valid_codes(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("service_choice: 17", "ailab/emotion-editor"))
    assert ":5: operations[0].params.service_choice: unknown code 17" in msg
    assert "use a code 10-16 or 100, or a name such as dimple_smile" in msg


@pytest.mark.parametrize("legacy", ["0", "3", '"2"'])
def test_legacy_emotion_codes_are_refused_with_explanation(tmp_path: Path, legacy: str) -> None:
    msg = error_of(tmp_path, ops_manifest(f"service_choice: {legacy}", "ailab/emotion-editor"))
    assert ":5: operations[0].params.service_choice:" in msg
    assert "legacy V1.0 code" in msg
    assert "10-16 or 100" in msg


def test_ai_smile_rejects_numbers_and_lists_names(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("expression_type: grin", "perfectcorp/ai-smile"))
    assert "unknown value 'grin'" in msg
    assert "smile_with_teeth_visible" in msg and "closed_mouth_smile" in msg


@pytest.mark.parametrize("value", ["true", "1.5", "{a: 1}", "null"])
def test_enum_wrong_types(tmp_path: Path, value: str) -> None:
    msg = error_of(tmp_path, ops_manifest(f"filter_type: {value}"))
    assert ":5: operations[0].params.filter_type:" in msg


# ----------------------------------------------------------------------- int params


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("101", "101 is out of range; use a whole number 0-100"),
        ("-1", "-1 is out of range"),
        ("true", "expected a whole number 0-100, got true"),
        ("7.5", "expected a whole number 0-100, got 7.5"),
        ('"70"', "expected a whole number 0-100, got '70'"),
        ("soft", "got 'soft'"),
    ],
)
def test_int_param_errors(tmp_path: Path, value: str, needle: str) -> None:
    msg = error_of(tmp_path, ops_manifest(f"smoothing: {value}"))
    assert ":5: operations[0].params.smoothing: " in msg
    assert needle in msg


def test_int_bounds_are_inclusive(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest("smoothing: [0, 100]"))
    assert [v.params["smoothing"] for v in m.variants] == [0, 100]


# ---------------------------------------------------------------- unknown / missing


def test_unknown_param_lists_known_ones(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("smoothnes: 3"))
    assert ":5: operations[0].params.smoothnes: unknown param for ailab/face-beauty-pro" in msg
    assert "did you mean smoothing?" in msg
    assert "whitening" in msg


def test_unknown_operation_lists_known_ones(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
          - op: ailab/face-swop
        output: out
        """,
    )
    assert ":4: operations[1].op: unknown operation 'ailab/face-swop'" in msg
    assert "did you mean ailab/face-swap?" in msg
    for name in OPERATIONS:
        assert name in msg


def test_missing_required_param(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
          - op: ailab/emotion-editor
            params: {}
          - op: ailab/face-swap
        output: out
        """,
    )
    lines = msg.splitlines()
    assert len(lines) == 2
    assert ":5: operations[1].params: service_choice is required" in lines[0]
    assert "e.g. service_choice: dimple_smile" in lines[0]
    assert ":6: operations[2].params: image_template is required" in lines[1]


def test_unknown_top_level_key_lists_known(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations: [{op: ailab/face-beauty-pro}]
        output: out
        colour: red
        """,
    )
    assert re.search(r":4: colour: unknown key; known keys: .*concurrency", msg)


def test_unknown_key_in_operation_entry(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
            parms: {smoothing: 1}
        output: out
        """,
    )
    assert ":4: operations[0].parms: unknown key; known keys: op, params" in msg


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("concurrency: 0", ":4: concurrency: input should be greater than or equal to 1 (got 0)"),
        ("concurrency: 1001", ":4: concurrency: input should be less than or equal to 1000"),
        ("concurrency: '8'", ":4: concurrency: input should be a valid integer (got '8')"),
        ("concurrency: true", ":4: concurrency: input should be a valid integer (got true)"),
        ("max_attempts: 101", ":4: max_attempts: input should be less than or equal to 100"),
        ("max_attempts: 0", ":4: max_attempts: "),
        ("emulator: 1", ":4: emulator: input should be a valid boolean"),
        ("auto_fix: 'yes'", ":4: auto_fix: input should be a valid boolean"),
        ("name: ''", ":4: name: must not be empty"),
        ("max_credits: -1", ":4: max_credits: must be a finite number >= 0 (got -1)"),
        ("max_credits: {ailab: -5}", ":4: max_credits.ailab: input should be greater"),
        ("max_credits: {openai: 5}", ":4: max_credits.openai: not an allowed key"),
        ("max_credits: lots", ":4: max_credits: expected a number"),
        ("max_credits: true", ":4: max_credits: expected a number"),
    ],
)
def test_top_level_value_errors(tmp_path: Path, line: str, needle: str) -> None:
    msg = error_of(
        tmp_path,
        f"""
        inputs: "*.jpg"
        operations: [{{op: ailab/face-beauty-pro}}]
        output: out
        {line}
        """,
    )
    assert needle in msg


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("operations: [{op: ailab/face-beauty-pro}]\noutput: out\n", ":1: inputs: required"),
        ('inputs: "*.jpg"\noutput: out\n', ":1: operations: required"),
        ('inputs: "*.jpg"\noperations: [{op: ailab/face-beauty-pro}]\n', ":1: output: required"),
        ("inputs: []\noperations: [{op: x}]\noutput: o\n", ":1: inputs: give at least one"),
        ('inputs: [""]\noperations: [{op: x}]\noutput: o\n', ":1: inputs: a pattern is empty"),
        ('inputs: "*.jpg"\noperations: []\noutput: o\n', ":2: operations: list at least one"),
        ('inputs: "*.jpg"\noperations: [{op: x}]\noutput: ""\n', ":3: output: must name"),
        ("inputs: 5\noperations: [{op: x}]\noutput: o\n", ":1: inputs: expected a list"),
        ('inputs: "*"\noperations: [{params: {}}]\noutput: o\n', ":2: operations[0].op: required"),
        ('inputs: "*"\noperations: [{op: 3}]\noutput: o\n', ":2: operations[0].op: input should"),
        ('inputs: "*"\noperations: {op: x}\noutput: o\n', ":2: operations: expected a list"),
    ],
)
def test_structure_errors(tmp_path: Path, text: str, needle: str) -> None:
    assert needle in error_of(tmp_path, text)


def test_not_a_mapping(tmp_path: Path) -> None:
    assert "job.yaml:1: (top level): a manifest is a mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "(got a list)" in error_of(tmp_path, "- a\n- b\n")
    assert "(got an empty file)" in error_of(tmp_path, "")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'inputs: "*.jpg"\noperations: [\noutput: out\n')
    assert re.search(r"job\.yaml:\d+: invalid YAML: ", msg)


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
            params: {smoothing: 1, smoothing: 2}
        output: out
        """,
    )
    assert (
        "job.yaml:4: operations[0].params.smoothing: duplicate key (first given on line 4)" in msg
    )


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match="folder"):
        load_manifest(tmp_path)


def test_output_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    msg = error_of(tmp_path, ops_manifest("{}"))
    assert ":6: output: " in msg and "is a file" in msg


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/face-beauty-pro
            params: {smoothing: 200, filter_type: nope}
          - op: ailab/emotion-editor
            params: {service_choice: 1}
        output: out
        concurrency: 0
        """,
    )
    lines = msg.splitlines()
    assert [int(line.split(":")[1]) for line in lines] == [4, 4, 6, 8]
    assert all(line.startswith(str(tmp_path / "job.yaml")) for line in lines)


def test_manifest_error_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_manifest(write(tmp_path, "inputs: 1\n"))
    assert info.value.exit_code == 2


# ------------------------------------------------------------------------ expansion


def test_cross_product_in_deterministic_order(tmp_path: Path) -> None:
    m = load(tmp_path, ops_manifest("{smoothing: [10, 20], whitening: 5, filter_type: [calm, 3]}"))
    assert [dict(v.params) for v in m.variants] == [
        {"smoothing": 10, "whitening": 5, "filter_type": 2},
        {"smoothing": 10, "whitening": 5, "filter_type": 3},
        {"smoothing": 20, "whitening": 5, "filter_type": 2},
        {"smoothing": 20, "whitening": 5, "filter_type": 3},
    ]
    assert [v.label for v in m.variants] == [
        "filter_type=calm,smoothing=10,whitening=5",
        "filter_type=sunny_day,smoothing=10,whitening=5",
        "filter_type=calm,smoothing=20,whitening=5",
        "filter_type=sunny_day,smoothing=20,whitening=5",
    ]
    again = load(
        tmp_path, ops_manifest("{smoothing: [10, 20], whitening: 5, filter_type: [calm, 3]}")
    )
    assert [v.canonical() for v in again.variants] == [v.canonical() for v in m.variants]


def test_empty_list_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("smoothing: []"))
    assert ":5: operations[0].params.smoothing: empty list" in msg


def test_error_in_list_element_names_index_and_line(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/emotion-editor
            params:
              service_choice:
                - big_grin
                - frown
        output: out
        """,
    )
    assert ":7: operations[0].params.service_choice[1]: unknown value 'frown'" in msg


def test_nested_list_is_an_error(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("smoothing: [[1, 2]]"))
    assert "operations[0].params.smoothing[0]: expected a single value or a list" in msg


def test_duplicates_are_removed_across_entries_and_aliases(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        """
        inputs: "*.jpg"
        operations:
          - op: ailab/emotion-editor
            params: {service_choice: [big_grin, 12, "12", Big Grin, sad]}
          - op: ailab/emotion-editor
            params: {service_choice: [sad, 10]}
          - op: ailab/face-beauty-pro
            params: {smoothing: 5}
          - op: ailab/face-beauty-pro
            params: {smoothing: [5]}
        output: out
        """,
    )
    assert [(v.operation.name, v.label) for v in m.variants] == [
        ("ailab/emotion-editor", "service_choice=big_grin"),
        ("ailab/emotion-editor", "service_choice=sad"),
        ("ailab/emotion-editor", "service_choice=dimple_smile"),
        ("ailab/face-beauty-pro", "smoothing=5"),
    ]


def test_labels_are_unique_and_safe_within_an_operation(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        ops_manifest(
            "{smoothing: [0, 50, 100], whitening: [0, 100], thinface: 1, filter_type: [1, 35]}"
        ),
    )
    labels = [v.label for v in m.variants]
    assert len(labels) == len(set(labels)) == 12
    for label in labels:
        assert re.fullmatch(r"[A-Za-z0-9._=,-]+", label)


# ---------------------------------------------------------------------- path params


def test_path_param_resolves_relative_to_manifest(tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    make_portrait(faces / "anna.jpg", seed=2)
    make_portrait(faces / "bob smith.png", seed=3)
    m = load(
        tmp_path,
        ops_manifest("image_template: [faces/anna.jpg, 'faces/bob smith.png']", "ailab/face-swap"),
    )
    assert [v.files["image_template"] for v in m.variants] == [
        faces / "anna.jpg",
        faces / "bob smith.png",
    ]
    assert [v.params for v in m.variants] == [{}, {}]
    assert [v.label for v in m.variants] == [
        "image_template=anna",
        "image_template=bob_smith",
    ]


def test_templates_sharing_a_stem_get_a_hash(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        make_portrait(tmp_path / sub / "face.jpg", seed=4)
    m = load(tmp_path, ops_manifest("image_template: [a/face.jpg, b/face.jpg]", "ailab/face-swap"))
    labels = [v.label for v in m.variants]
    assert len(set(labels)) == 2
    assert all(re.fullmatch(r"image_template=face-[0-9a-f]{6}", label) for label in labels)


def test_same_template_twice_is_deduplicated(tmp_path: Path) -> None:
    make_portrait(tmp_path / "t.jpg", seed=5)
    m = load(tmp_path, ops_manifest("image_template: [t.jpg, ./t.jpg]", "ailab/face-swap"))
    assert len(m.variants) == 1


def test_missing_template(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("image_template: nope.jpg", "ailab/face-swap"))
    assert ":5: operations[0].params.image_template: file not found: " in msg
    assert str(tmp_path / "nope.jpg") in msg


def test_template_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "faces").mkdir()
    msg = error_of(tmp_path, ops_manifest("image_template: faces", "ailab/face-swap"))
    assert ":5: operations[0].params.image_template: " in msg
    assert "faces is a folder; give the path of an image file" in msg


def test_template_must_be_a_string(tmp_path: Path) -> None:
    msg = error_of(tmp_path, ops_manifest("image_template: 5", "ailab/face-swap"))
    assert "expected a path to an image file, got 5" in msg


# --------------------------------------------------------------------------- plan


def test_describe_plan_lists_operations_and_labels(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        """
        name: plan
        inputs: "*.jpg"
        operations:
          - op: ailab/emotion-editor
            params: {service_choice: [big_grin, cool_pose]}
          - op: perfectcorp/ai-smile
            params: {expression_type: teeth}
        output: out
        max_credits: {ailab: 100}
        """,
    )
    lines = describe_plan(m)
    text = "\n".join(lines)
    assert "ailab/emotion-editor: 2 variants per input, 12 credits per success" in text
    assert "  - service_choice=big_grin" in lines
    assert "  - service_choice=cool_pose" in lines
    assert "perfectcorp/ai-smile: 1 variant per input, 1 unit per success" in text
    assert "  - expression_type=smile_with_teeth_visible" in lines
    assert "ailab: 100" in text
    assert lines[-1].startswith("3 variants in all")


def test_variant_canonical_is_stable_json(tmp_path: Path) -> None:
    v = Variant(OPERATIONS["ailab/face-beauty-pro"], {"whitening": 1, "smoothing": 2})
    assert v.canonical() == (
        '{"files":{},"op":"ailab/face-beauty-pro","params":{"smoothing":2,"whitening":1}}'
    )


def test_labels_that_sanitise_alike_are_disambiguated(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    make_portrait(tmp_path / "x" / "a b.jpg", seed=6)
    make_portrait(tmp_path / "a_b.jpg", seed=7)
    m = load(tmp_path, ops_manifest("image_template: ['x/a b.jpg', a_b.jpg]", "ailab/face-swap"))
    labels = [v.label for v in m.variants]
    assert len(set(labels)) == 2
    assert all(label.startswith("image_template=a_b-") for label in labels)


def test_long_labels_are_capped(tmp_path: Path) -> None:
    name = "portrait-" + "x" * 200 + ".jpg"
    make_portrait(tmp_path / name, seed=8)
    m = load(tmp_path, ops_manifest(f"image_template: {name}", "ailab/face-swap"))
    assert len(m.variants[0].label) <= 120
    assert m.variants[0].label.startswith("image_template=portrait-xxx")


# ------------------------------------------------------------- issue 8/11 settings


def test_failure_ratio_settings(tmp_path: Path) -> None:
    base = textwrap.dedent(ops_manifest("smoothing: 1")).lstrip("\n")
    m = load(tmp_path, base)
    assert (m.max_failure_ratio, m.min_items_for_failure_ratio) == (None, 20)
    m = load(tmp_path, base + "max_failure_ratio: 0.25\nmin_items_for_failure_ratio: 50\n")
    assert (m.max_failure_ratio, m.min_items_for_failure_ratio) == (0.25, 50)
    assert load(tmp_path, base + "max_failure_ratio: 1\n").max_failure_ratio == 1.0


def test_absolute_and_parent_input_patterns_are_allowed(tmp_path: Path) -> None:
    m = load(
        tmp_path,
        """
        inputs: ["../photos/**/*.jpg", "/data/shoots/*.png", "~/photos/*.jpg"]
        operations: [{op: ailab/face-beauty-pro}]
        output: out
        """,
    )
    assert m.inputs == ("../photos/**/*.jpg", "/data/shoots/*.png", "~/photos/*.jpg")


def test_cross_product_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_VARIANTS", 4)
    assert len(load(tmp_path, ops_manifest("{smoothing: [1, 2], whitening: [1, 2]}")).variants) == 4
    msg = error_of(tmp_path, ops_manifest("{smoothing: [1, 2, 3], whitening: [1, 2]}"))
    assert ":4: operations[0].params: the lists expand into 6 variants" in msg


def test_template_of_another_format_passes_with_auto_fix(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (120, 160), (10, 20, 30)).save(tmp_path / "face.webp", format="WEBP")
    text = textwrap.dedent(ops_manifest("image_template: face.webp", "ailab/face-swap"))
    assert "WEBP is not accepted by ailab/face-swap" in error_of(tmp_path, text)
    m = load(tmp_path, text + "auto_fix: true\n")
    assert m.variants[0].files == {"image_template": tmp_path / "face.webp"}


def test_oversized_template_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    with big.open("wb") as fp:
        fp.truncate(6 * 1024 * 1024)  # sparse: 6 MB of zeros, over face swap's 5 MB
    msg = error_of(tmp_path, ops_manifest("image_template: big.jpg", "ailab/face-swap"))
    assert "big.jpg is 6.0 MB, over the 5 MB limit of ailab/face-swap" in msg


def test_output_problems(tmp_path: Path) -> None:
    from pipeline.manifest import output_problem

    assert output_problem(tmp_path / "new" / "deeper") is None
    (tmp_path / "f").write_text("x")
    assert output_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file; give a folder path"
    assert output_problem(tmp_path / "f" / "x") == (
        f"{tmp_path / 'f'} (above {tmp_path / 'f' / 'x'}) is a file; give a folder path"
    )
    (tmp_path / "sys-link").symlink_to("/sys/kernel")
    problem = output_problem(tmp_path / "sys-link" / "out")
    assert problem is not None and "is inside /sys" in problem
    assert "(it resolves to /sys/kernel/out)" in problem
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert output_problem(tmp_path / "dangling") == (
        f"{tmp_path / 'dangling'} is a link to nothing; remove it or fix it"
    )
