"""The four operations: their parameters, input limits and prices, as data.

Everything here is transcribed from ``docs/vendors.md`` (cited per entry by heading)
and shared by the manifest validator, the local preflight and the providers, so a
limit is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = [
    "OPERATIONS",
    "ImageLimits",
    "OperationSpec",
    "ParamSpec",
    "get_operation",
]

# A vendor's name: a key of pipeline.vendors.VENDORS, which holds everything else
# about it (tests/unit/test_vendor_registry.py checks every operation's vendor is
# there and that its price_unit is the vendor's).
Vendor = str

MB = 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    """Documented input limits of one operation.

    ``max_side_exclusive``: every side must be strictly below it (AILab "less than
    4096x4096px"). ``max_long_side``: the long side must be at most it (Perfect Corp
    "long side <= 4096"). ``min_side_exclusive``: every side strictly above it.
    """

    formats: frozenset[str]  # Pillow format names: "JPEG", "PNG", "HEIF"
    max_bytes: int
    max_side_exclusive: int | None = None
    max_long_side: int | None = None
    min_side_exclusive: int | None = None
    max_bytes_inclusive: bool = True  # AILab "no more than"; Perfect Corp "< 10MB"
    # Who sets these limits, for messages ("... limit of ailab/face-beauty-pro").
    # OperationSpec fills it with the operation name when left empty.
    label: str = ""

    def describe(self) -> str:
        """One line for error messages: what the vendor accepts."""
        parts = ["/".join(sorted(self.formats))]
        rel = "<=" if self.max_bytes_inclusive else "<"
        parts.append(f"{rel} {self.max_bytes / MB:g} MB")
        if self.max_side_exclusive:
            parts.append(f"each side < {self.max_side_exclusive} px")
        if self.max_long_side:
            parts.append(f"long side <= {self.max_long_side} px")
        if self.min_side_exclusive:
            parts.append(f"each side > {self.min_side_exclusive} px")
        return ", ".join(parts)


@dataclass(frozen=True)
class ParamSpec:
    """One manifest parameter, named as the vendor names the field.

    ``kind``: ``int`` (range ``minimum..maximum``), ``enum`` (``choices`` maps
    readable names to vendor codes; codes are accepted too), ``path`` (a file
    relative to the manifest, sent as an extra image), ``choice`` (a fixed string).
    """

    name: str
    kind: Literal["int", "enum", "path", "choice"]
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    choices: dict[str, int | str] = field(default_factory=dict)
    default: int | str | None = None
    legacy_codes: frozenset[int | str] = frozenset()  # documented but not to be sent
    help: str = ""


@dataclass(frozen=True)
class OperationSpec:
    """An operation of the manifest (``op:``) and what the vendor charges for it."""

    name: str
    vendor: Vendor
    is_async: bool
    params: tuple[ParamSpec, ...]
    limits: ImageLimits
    price: float  # per successful task, in the vendor's unit
    price_unit: Literal["credits", "units"]
    credit_pool: str = ""  # AILab per-API pool (docs/vendors.md, "AILab: credits and prices")

    def __post_init__(self) -> None:
        # Several operations share one ImageLimits value; give each its own label so
        # preflight messages can say whose limit an image breaks.
        if not self.limits.label:
            object.__setattr__(self, "limits", replace(self.limits, label=self.name))

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


# The current (V1.1.0) table (docs/vendors.md, "AILab: emotion editor"). 0-3 are the
# V1.0 codes whose live support is unknown (docs/vendors.md, "AILab: legacy expression
# codes"), so we accept them nowhere and say why.
EMOTION_CHOICES: dict[str, int | str] = {
    "dimple_smile": 10,
    "pear_dimple_smile": 11,
    "big_grin": 12,
    "standard_grin": 13,
    "cool_pose": 14,
    "sad": 15,
    "forced_smile": 16,
    "opening_eyes": 100,
}

# filter_type 1..35 (docs/vendors.md, "AILab: face beauty pro").
FILTER_CHOICES: dict[str, int | str] = {
    name: code
    for code, name in enumerate(
        [
            "black_and_white",
            "calm",
            "sunny_day",
            "journey",
            "beautify_skin",
            "hong_kong_style",
            "aesthetic",
            "lovely",
            "new_york",
            "sakura",
            "seventeen",
            "soft_light",
            "afternoon_tea",
            "brighten_skin",
            "chaplin",
            "floral",
            "memories",
            "ice_beauty",
            "paris",
            "time",
            "lomo",
            "old_times",
            "early_spring",
            "story",
            "abao_color",
            "fill_light",
            "warm",
            "gorgeous",
            "lavender",
            "chanel",
            "prague",
            "old_dreams",
            "peach_blossom",
            "pink",
            "misty_rain",
        ],
        start=1,
    )
}

# The only two documented values (docs/vendors.md, "Perfect Corp: create task").
SMILE_CHOICES: dict[str, int | str] = {
    "smile_with_teeth_visible": "smile_with_teeth_visible",
    "closed_mouth_smile": "closed_mouth_smile",
    "teeth": "smile_with_teeth_visible",
    "closed_mouth": "closed_mouth_smile",
}

_AILAB_FORMATS = frozenset({"JPEG", "PNG"})

# JPEG/JPG/PNG, <= 5 MB, < 4096x4096 px (docs/vendors.md, "AILab: image limits").
_AILAB_5MB = ImageLimits(formats=_AILAB_FORMATS, max_bytes=5 * MB, max_side_exclusive=4096)
# Face beauty pro: <= 2 MB, > 48x48 and < 4096x4096 px (docs/vendors.md, "AILab: image
# limits").
_BEAUTY_LIMITS = ImageLimits(
    formats=_AILAB_FORMATS, max_bytes=2 * MB, max_side_exclusive=4096, min_side_exclusive=48
)
# Long side <= 4096, file < 10MB, jpg/jpeg/png/heic (docs/vendors.md, "Perfect Corp:
# image limits").
_SMILE_LIMITS = ImageLimits(
    formats=frozenset({"JPEG", "PNG", "HEIF"}),
    max_bytes=10 * MB,
    max_long_side=4096,
    max_bytes_inclusive=False,
)


def _slider(name: str, help_text: str) -> ParamSpec:
    # Six optional int sliders 0-100, default 50 (docs/vendors.md, "AILab: face beauty pro").
    return ParamSpec(name=name, kind="int", minimum=0, maximum=100, default=50, help=help_text)


OPERATIONS: dict[str, OperationSpec] = {
    "ailab/emotion-editor": OperationSpec(
        name="ailab/emotion-editor",
        vendor="ailab",
        is_async=False,
        params=(
            ParamSpec(
                name="service_choice",
                kind="enum",
                required=True,
                choices=EMOTION_CHOICES,
                legacy_codes=frozenset({0, 1, 2, 3}),
                help="expression to apply",
            ),
        ),
        limits=_AILAB_5MB,
        price=12,
        price_unit="credits",
        credit_pool="portrait_expression_editing",
    ),
    "ailab/face-swap": OperationSpec(
        name="ailab/face-swap",
        vendor="ailab",
        is_async=True,
        params=(
            ParamSpec(
                name="image_template",
                kind="path",
                required=True,
                help="image providing the face; the input is the target",
            ),
        ),
        limits=_AILAB_5MB,
        price=5,
        price_unit="credits",
        credit_pool="portrait_ai_face_swap",
    ),
    "ailab/face-beauty-pro": OperationSpec(
        name="ailab/face-beauty-pro",
        vendor="ailab",
        is_async=True,
        params=(
            _slider("whitening", "whitening degree"),
            _slider("smoothing", "skin smoothing degree"),
            _slider("thinface", "face slimming degree"),
            _slider("shrink_face", "small face degree"),
            _slider("enlarge_eye", "big eyes degree"),
            _slider("remove_eyebrow", "eyebrow removal degree"),
            ParamSpec(name="filter_type", kind="enum", choices=FILTER_CHOICES, help="filter"),
            ParamSpec(
                name="task_type",
                kind="choice",
                choices={"async": "async", "sync": "sync"},
                default="async",
                help="async (default: task id journaled, never paid twice) or sync",
            ),
        ),
        limits=_BEAUTY_LIMITS,
        price=15,
        price_unit="credits",
        credit_pool="portrait_facial_beautification_pro",
    ),
    "perfectcorp/ai-smile": OperationSpec(
        name="perfectcorp/ai-smile",
        vendor="perfectcorp",
        is_async=True,
        params=(
            ParamSpec(
                name="expression_type",
                kind="enum",
                required=True,
                choices=SMILE_CHOICES,
                help="smile style",
            ),
        ),
        limits=_SMILE_LIMITS,
        price=1,
        price_unit="units",
    ),
}


def get_operation(name: str) -> OperationSpec:
    """The spec of ``name``; raises ``KeyError`` listing the known operations."""
    try:
        return OPERATIONS[name]
    except KeyError:
        known = ", ".join(sorted(OPERATIONS))
        raise KeyError(f"unknown operation {name!r}; known: {known}") from None
