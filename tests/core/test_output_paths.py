"""result_relpath: collision-free, bounded, inside the output folder, stable.

The property tests build name sets out of pieces chosen to collide under the
obvious sanitisations (space/underscore/dash, NFC/NFD, case, image extensions,
dots) and check the mapping on the path a case-insensitive, normalisation-
insensitive file system would compare.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.outputs import (
    MAX_COMPONENT_BYTES,
    RESULT_EXTS,
    atomic_write_bytes,
    resolve_inside,
    result_relpath,
    result_relpaths,
)

OP = "ailab/emotion-editor"
EXTS = ("jpg", "png", "webp")


def fold(path: str) -> str:
    """What a case- and normalisation-insensitive file system compares."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", path).casefold())


def rel(input_rel: str, variant: str = "default", ext: str = "jpg", op: str = OP) -> str:
    return result_relpath(op, variant, input_rel, ext)


def check_safe(path: str) -> None:
    assert not path.startswith("/")
    parts = path.split("/")
    for part in parts:
        assert part not in ("", ".", "..")
        assert "\0" not in part and "\\" not in part
        assert len(part.encode("utf-8", "surrogatepass")) <= MAX_COMPONENT_BYTES
        assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in part)
        assert not part.startswith(("-", "."))  # never hidden (the sweep) nor an option
    assert len(path.encode("utf-8")) < 2000
    # A result file always ends with a result extension; folders never do.
    assert parts[-1].rsplit(".", 1)[-1] in {"jpg", "jpeg", "png", "webp"}


# -- property tests -------------------------------------------------------------------

PIECES = [
    "a", "A", "b", "B", "ana", "Ana", "ANA", " ", "_", "-", "\u2013", ".", "..", "~",
    "\u00e9", "e\u0301", "E\u0301", "\u00c9", "\u00df", "ss", "SS", "\u1e9e", "\u212a", "k",
    "K", "\u0130", "i", "\u0131", "jpg", "JPG", "jpeg", "png", "PNG", "webp", ".jpg", ".png",
    ".jpeg", ".JPG", ".webp", "\u4e2d", "\x00", "\x1f", "\u202e", "\ufeff", "\udcff", "\\",
    "nul", "con", "_deep", "=", ",", "+", "@", "x" * 60, "\u00e9" * 40,
]  # fmt: skip

name = st.lists(st.sampled_from(PIECES), min_size=0, max_size=6).map("".join)
long_name = st.builds(
    lambda n, tail: "y" * n + tail,
    st.integers(150, 300),
    st.sampled_from(["", ".jpg", ".png", ".JPG", "\u00e9.jpg", ".png.jpg"]),
)
input_rel = st.lists(st.one_of(name, long_name), min_size=1, max_size=4).map("/".join)
variant = st.one_of(
    st.sampled_from(["default", "Default", "service_choice=big_grin", "a/b", "..", ""]), name
)
pair = st.tuples(input_rel, variant)


def _nfd(s: str) -> str:
    return unicodedata.normalize("NFD", s)


# Each turns a name into a near-twin that a careless sanitiser, a case-insensitive or
# a normalisation-insensitive file system would confuse with it.
TWINS = [
    str.upper, str.lower, str.swapcase, str.title, _nfd,
    lambda s: unicodedata.normalize("NFC", s),
    lambda s: s.replace(" ", "_"), lambda s: s.replace("_", " "),
    lambda s: s.replace("-", "\u2013"), lambda s: s.replace("e", "\u00e9"),
    lambda s: s.replace("\u00e9", "e\u0301"), lambda s: s.replace("ss", "\u00df"),
    lambda s: s + ".jpg", lambda s: s + ".png", lambda s: s + ".JPG", lambda s: s + ".jpeg",
    lambda s: s.rsplit(".", 1)[0], lambda s: s.replace(".", "_"), lambda s: s + " ",
    lambda s: s + ".", lambda s: "." + s, lambda s: s.replace("k", "\u212a"),
    lambda s: s[:-1], lambda s: s + "~a", lambda s: s + "/x.jpg",
]  # fmt: skip


@st.composite
def twin_sets(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A few names, each with several near-twins, combined into folder/file paths."""
    seeds = draw(st.lists(st.one_of(name, long_name, st.sampled_from(
        ["ana.jpg", "a b.jpg", "x.png", "x.png.jpg", "Studio A", "stra\u00dfe", "Zo\u00eb.jpg",
         "kelvin.png", "2026-11", "_deep", "img_0001.jpg"]
    )), min_size=1, max_size=3))  # fmt: skip
    names: set[str] = set()
    for seed in seeds:
        names.add(seed)
        chains = st.lists(st.sampled_from(TWINS), min_size=1, max_size=3)
        for chain in draw(st.lists(chains, min_size=1, max_size=5)):
            current = seed
            for twin in chain:
                current = twin(current)
                names.add(current)
    ordered = sorted(names)
    rels = set(ordered)
    for _ in range(draw(st.integers(0, 12))):
        folder, file = draw(st.sampled_from(ordered)), draw(st.sampled_from(ordered))
        rels.add(f"{folder}/{file}")
    variants = draw(st.lists(st.sampled_from(["default", "Default", "a b", "a_b", *ordered[:3]]),
                             min_size=1, max_size=2, unique=True))  # fmt: skip
    return sorted((r, v) for r in rels for v in variants)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.one_of(twin_sets(), st.lists(pair, min_size=2, max_size=40, unique=True)),
       data=st.data())  # fmt: skip
def test_mapping_is_injective_after_nfc_and_casefold(
    pairs: list[tuple[str, str]], data: st.DataObject
) -> None:
    # Each item gets its own result format, as the result bytes decide it.
    exts = data.draw(st.lists(st.sampled_from(EXTS), min_size=len(pairs), max_size=len(pairs)))
    out = [rel(i, v, e) for (i, v), e in zip(pairs, exts, strict=True)]
    folded = [fold(p) for p in out]
    assert len(set(folded)) == len(pairs), sorted(zip(folded, pairs, strict=True))
    # No result sits where another result needs a folder.
    dirs = {fold(p).rsplit("/", 1)[0] + "/" for p in out}
    prefixes = {f[: i + 1] for f in dirs for i, c in enumerate(f) if c == "/"}
    assert not any(f + "/" in prefixes for f in folded)
    for p in out:
        check_safe(p)


@settings(max_examples=300, deadline=None)
@given(i=input_rel, v=variant, e=st.sampled_from(EXTS))
def test_mapping_is_stable_and_safe(i: str, v: str, e: str) -> None:
    first = rel(i, v, e)
    assert rel(i, v, e) == first
    check_safe(first)
    # One output component per input component, plus operation and variant.
    assert first.count("/") == i.count("/") + 2


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pairs=twin_sets())
def test_mapped_paths_are_writable_and_distinct_on_disk(
    tmp_path_factory: pytest.TempPathFactory, pairs: list[tuple[str, str]]
) -> None:
    root = tmp_path_factory.mktemp("out")
    for n, (i, v) in enumerate(pairs):
        target = resolve_inside(root, rel(i, v))
        atomic_write_bytes(target, str(n).encode(), root=root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == len(pairs)
    assert sorted(int(p.read_bytes()) for p in files) == list(range(len(pairs)))


# -- examples, one per listed case ----------------------------------------------------


def test_plain_names_are_kept() -> None:
    assert rel("studio/ana.jpg", "service_choice=big_grin") == (
        "ailab-emotion-editor/service_choice=big_grin/studio/ana.jpg"
    )
    assert (
        rel("2026.11/shoot_1/a-b.v2.jpeg")
        == "ailab-emotion-editor/default/2026.11/shoot_1/a-b.v2.jpeg"
    )
    assert rel("_up/shared/x.webp", ext="webp") == "ailab-emotion-editor/default/_up/shared/x.webp"


def test_space_underscore_and_dash_lookalikes_differ() -> None:
    names = ["a b.jpg", "a_b.jpg", "a\u2013b.jpg", "a-b.jpg", "a  b.jpg", "a\tb.jpg"]
    out = [rel(n) for n in names]
    assert len({fold(p) for p in out}) == len(names)
    assert out[1].endswith("/a_b.jpg") and out[3].endswith("/a-b.jpg")
    assert out[0].rsplit("/", 1)[1].startswith("a_b~")  # readable, disambiguated
    assert out[2].rsplit("/", 1)[1].startswith("a_b~")


def test_non_ascii_and_its_replacement_differ_and_stay_readable() -> None:
    a, b = rel("Zo\u00eb.jpg"), rel("Zo_.jpg")
    assert a != b
    assert a.rsplit("/", 1)[1].startswith("Zo\u00eb~")
    assert rel("\u4e2d\u6587/\u5199\u771f.jpg").split("/")[2].startswith("\u4e2d\u6587~")


def test_nfc_and_nfd_forms_differ_after_normalisation() -> None:
    nfc, nfd = "Zo\u00eb.jpg", "Zoe\u0308.jpg"
    assert unicodedata.normalize("NFC", nfd) == nfc
    a, b = rel(nfc), rel(nfd)
    assert fold(a) != fold(b)
    # Both readable parts are shown in NFC.
    assert a.rsplit("/", 1)[1][:4] == b.rsplit("/", 1)[1][:4] == "Zo\u00eb~"
    assert fold(rel("caf\u00e9/x.jpg")) != fold(rel("cafe\u0301/x.jpg"))


def test_names_differing_only_in_case_differ_after_casefold() -> None:
    names = [
        "ana.jpg",
        "Ana.jpg",
        "ANA.JPG",
        "ana.JPG",
        "stra\u00dfe.jpg",
        "strasse.jpg",
        "STRASSE.jpg",
    ]
    out = [rel(n) for n in names]
    assert len({fold(p) for p in out}) == len(names)
    assert out[0].endswith("/ana.jpg") and out[5].endswith("/strasse.jpg")
    dirs = [rel(f"{d}/x.jpg") for d in ("studio", "Studio", "STUDIO", "\u212aelvin", "kelvin")]
    assert len({fold(p) for p in dirs}) == len(dirs)
    labels = [rel("x.jpg", variant=v) for v in ("image_template=face", "image_template=Face")]
    assert fold(labels[0]) != fold(labels[1])


@pytest.mark.parametrize("e1", EXTS)
@pytest.mark.parametrize("e2", EXTS)
def test_image_extensions_never_collide_whatever_each_result_format(e1: str, e2: str) -> None:
    names = [
        "x.png",
        "x.png.jpg",
        "x.jpg",
        "x.jpg.png",
        "x",
        "x.jpeg",
        "x.webp",
        "x.png.png",
        "x.JPG",
    ]
    for a in names:
        for b in names:
            if a != b:
                assert fold(rel(a, ext=e1)) != fold(rel(b, ext=e2)), (a, e1, b, e2)
    assert rel("x.png", ext="jpg").endswith("/x.png.jpg")
    assert rel("x.png", ext="png").endswith("/x.png")
    assert rel("x.jpg", ext="jpg").endswith("/x.jpg")
    assert rel("x.png.jpg", ext="jpg").rsplit("/", 1)[1].startswith("x.png~")


def test_result_extension_is_normalised_and_checked() -> None:
    assert rel("a.jpg", ext="JPEG") == rel("a.jpg", ext="jpg")
    assert rel("a.jpg", ext=".png") == rel("a.jpg", ext="png")
    with pytest.raises(ValueError, match="jpg, png or webp"):
        rel("a.jpg", ext="gif")


@pytest.mark.parametrize("char", ["y", "\u00e9", "\u4e2d"])
def test_names_at_the_255_byte_limit_fit_with_room_for_the_temp_name(
    tmp_path: Path, char: str
) -> None:
    width = len(char.encode())
    stem = char * ((255 - 4) // width)
    a, b = stem + ".jpg", stem[:-1] + "z.jpg"
    assert len(a.encode()) <= 255
    out = [rel(a), rel(b), rel(a, ext="png"), rel("d" * 255 + "/x.jpg")]
    for p in out:
        check_safe(p)
    assert len({fold(p) for p in out[:2]}) == 2
    for n, p in enumerate(out):
        atomic_write_bytes(resolve_inside(tmp_path, p), bytes([n]), root=tmp_path)
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) == 4


def test_deep_trees_are_folded_but_stay_distinct(tmp_path: Path) -> None:
    deep = "/".join(f"level{n}" for n in range(200))
    a, b = rel(deep + "/a.jpg"), rel(deep.replace("level150", "levelX") + "/a.jpg")
    for p in (a, b):
        check_safe(p)
        assert p.count("/") <= 2 + 32
    assert a != b
    assert a.startswith("ailab-emotion-editor/default/level0/level1/")
    assert "/_deep~" in a and a.endswith("/a.jpg")
    # 40 folders of 40 bytes: over the byte budget rather than the depth limit.
    wide = "/".join(f"{n:02d}" + "w" * 38 for n in range(40)) + "/a.jpg"
    check_safe(rel(wide))
    assert sum(len(c) + 1 for c in rel(wide).split("/")[2:-1]) <= 1024
    assert rel(wide) != rel(wide.replace("39w", "39v"))
    for p in (a, b, rel(wide)):
        atomic_write_bytes(resolve_inside(tmp_path, p), b"x", root=tmp_path)
    # A real folder named like the marker is not the marker.
    assert rel("_deep/a.jpg") != rel("_Deep/a.jpg") and rel("_deep/a.jpg").count("~") == 0


@pytest.mark.parametrize(
    "input_rel",
    ["../../etc/passwd", "..", ".", "a/../b.jpg", "/etc/passwd", "a//b.jpg", "", "a/",
     "a\x00b.jpg", "a\nb.jpg", "\x1b[31m.jpg", "a\\..\\b.jpg", "-rf.jpg", ".hidden.jpg",
     ".x.part", "nul.jpg", "CON/x.jpg", "a.jpg.", "\udcff\udcfe.jpg", "~/x.jpg"],
)  # fmt: skip
def test_hostile_names_stay_inside(tmp_path: Path, input_rel: str) -> None:
    p = rel(input_rel)
    check_safe(p)
    target = resolve_inside(tmp_path, p)
    assert tmp_path.resolve() in target.parents
    atomic_write_bytes(target, b"ok", root=tmp_path)
    assert target.read_bytes() == b"ok"


def test_empty_and_dot_parts_do_not_merge_with_their_neighbours() -> None:
    forms = ["a/b.jpg", "a//b.jpg", "a/./b.jpg", "/a/b.jpg", "a/b.jpg/", "./a/b.jpg"]
    assert len({fold(rel(f)) for f in forms}) == len(forms)


@pytest.mark.parametrize("label", ["a/b", "../..", "..", "", "a\x00b", "/abs", "Default"])
def test_hostile_variant_labels_are_one_safe_component(label: str) -> None:
    p = rel("x.jpg", variant=label)
    check_safe(p)
    assert p.count("/") == 2
    assert p != rel("x.jpg", variant="default")
    assert rel("x.jpg", variant="a/b") != rel("b/x.jpg", variant="a")


def test_operation_folders() -> None:
    assert rel("x.jpg", op="perfectcorp/ai-smile").startswith("perfectcorp-ai-smile/")
    odd = [
        rel("x.jpg", op=o)
        for o in ("ailab/emotion-editor", "ailab-emotion/editor", "ailab-emotion-editor", "../x")
    ]
    assert len(set(odd)) == len(odd)
    for p in odd:
        check_safe(p)


def test_the_rule_is_pinned() -> None:
    """Changing the rule would rename every existing output: these must never change."""
    assert rel("a b.jpg") == "ailab-emotion-editor/default/a_b~jqjhdpz64c.jpg"
    assert rel("IMG_0001.JPG") == "ailab-emotion-editor/default/IMG_0001~qx6wdkozjx.jpg"
    assert rel("x.png.jpg") == "ailab-emotion-editor/default/x.png~njlgzgaozg.jpg"
    assert rel("Studio A/ana.png", "a/b", "png") == (
        "ailab-emotion-editor/a_b~qnjpnxbgs3/Studio_A~swnwewcghg/ana.png"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.one_of(twin_sets(), st.lists(pair, min_size=2, max_size=30, unique=True)),
       data=st.data())  # fmt: skip
def test_displaced_results_collide_with_nothing(
    pairs: list[tuple[str, str]], data: st.DataObject
) -> None:
    # A displaced result (another item stored its result at the item's path in an
    # earlier run) gets a name of its own, keyed: distinct from every mapped path,
    # and from every other item's displaced one, after NFC and case folding.
    exts = data.draw(st.lists(st.sampled_from(EXTS), min_size=len(pairs), max_size=len(pairs)))
    keys = data.draw(st.lists(st.text("0123456789abcdef", min_size=40, max_size=40),
                              min_size=2, max_size=2, unique=True))  # fmt: skip
    mapped = [rel(i, v, e) for (i, v), e in zip(pairs, exts, strict=True)]
    displaced = [
        result_relpath(OP, v, i, e, displaced_key=k)
        for (i, v), e in zip(pairs, exts, strict=True)
        for k in keys
    ]
    folded = [fold(p) for p in mapped + displaced]
    assert len(set(folded)) == len(folded)
    for p, (i, v) in zip(displaced[:: len(keys)], pairs, strict=True):
        check_safe(p)
        # In the same folder as its mapped path: only the file name differs.
        assert p.rsplit("/", 1)[0] == rel(i, v, "jpg").rsplit("/", 1)[0]


@given(i=input_rel, v=variant)
def test_the_paths_for_every_result_format_are_the_mapping_for_each(i: str, v: str) -> None:
    assert result_relpaths(OP, v, i) == tuple(rel(i, v, e) for e in RESULT_EXTS)
