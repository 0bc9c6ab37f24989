"""``preprocessor_config.json``: the released image processor's settings (pixel limits, rescale factor, mean, std).

Keye-VL 1.5 resizes an image twice. keye-vl-utils' ``fetch_image`` first fits it into ``[min_pixels,
max_pixels]`` of the message item (``data_pipelines.image_reader.load_image``; 3,136 to 16,056,320 pixels by
default); the released image processor (``KeyeVL1_5ImageProcessor``) then fits that result into its own limits, the
``min_pixels``/``max_pixels`` of this file (3,136 and 1,003,520 as published), with a PIL bilinear resize, before
rescaling by ``rescale_factor`` and normalising with ``image_mean``/``image_std`` (``keye.image_processing``).
Video frames get only the rescale and normalisation: keye-vl-utils hands the processor their slow and fast sizes,
so the released processor does not resize them again, and this file's pixel limits never change a video.

The file is the released one, key for key, so a checkpoint directory works with the released processor code too.
Reading it is strict about what it uses and lenient about transformers' bookkeeping:

- a key of :class:`ImageProcessorConfig` with a wrong JSON type (``"max_pixels": "1003520"``, ``"do_resize": 1``)
  or an impossible value is an error naming the key and the file;
- ``image_processor_type``, ``processor_class``, ``_processor_class``, ``auto_map`` (written by transformers and by
  the released checkpoint) and ``size`` (transformers' image processors add ``{"min_pixels", "max_pixels"}`` or
  ``{"shortest_edge", "longest_edge"}``; the released processor reads its limits from ``min_pixels``/``max_pixels``
  and ignores ``size`` unless it names a fixed ``height``/``width``, which is refused here) are accepted and
  ignored; they are rewritten with the released values on save;
- an unknown key close to a setting's name (a typo such as ``max_pixel``, which must not fall back silently to a
  default) is an error naming it, the file and the setting meant; any other unknown key (another tool's extra in a
  downloaded checkpoint) is ignored with a warning naming it;
- ``do_convert_rgb`` is kept for the released file's sake and has no effect: keye-vl-utils has already converted
  every image to RGB before the processor sees it, here as there.

A directory without the file (checkpoints written before it existed) gets :class:`ImageProcessorConfig`'s defaults,
the published Keye-VL 1.5 values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keye.released_image_processor import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MEAN,
    DEFAULT_MIN_PIXELS,
    DEFAULT_RESCALE,
    DEFAULT_STD,
    MERGE_SIZE,
    PATCH_SIZE,
)
from keye.typed_config import ConfigError

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# The released checkpoint's identity keys, written first (in this order) by ``to_json``.
RELEASED_IDENTITY: dict[str, Any] = {
    "image_processor_type": "KeyeVL1_5ImageProcessor",
    "processor_class": "KeyeVL1_5Processor",
    "auto_map": {
        "AutoImageProcessor": "image_processing_keye_vl_1_5.KeyeVL1_5ImageProcessor",
        "AutoProcessor": "processing_keye_vl_1_5.KeyeVL1_5Processor",
    },
}
# Keys transformers (or the released file) writes that carry no setting of ours: accepted and ignored on load.
TOLERATED_KEYS = frozenset({"image_processor_type", "processor_class", "_processor_class", "auto_map", "size"})
# PIL resampling filters by number (``PIL.Image.Resampling``), the form transformers saves them in.
RESAMPLE_FILTERS = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}
_HERE = "ImageProcessorConfig"  # where a value error of a config built in code is reported


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image processor fields of Keye-VL 1.5's ``preprocessor_config.json``; defaults are the published values.

    ``min_pixels``/``max_pixels`` bound the processor's own (second) resize of an image; the first resize, in the
    data pipeline, uses the message item's limits (``ProcessorConfig.min_pixels``/``max_pixels`` by default).
    ``patch_size``, ``temporal_patch_size`` and ``merge_size`` describe the vision tower and must be 14, 1 and 2.
    """

    do_resize: bool = True
    resample: int = 2  # PIL.Image.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = DEFAULT_RESCALE
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = DEFAULT_MEAN
    image_std: tuple[float, float, float] = DEFAULT_STD
    do_convert_rgb: bool = True
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = PATCH_SIZE
    temporal_patch_size: int = 1
    merge_size: int = MERGE_SIZE

    def __post_init__(self) -> None:
        self.validate(_HERE)

    # --- checks ----------------------------------------------------------------------------------------------
    def validate(self, where: str) -> None:
        """Raise ``ConfigError`` naming the key and ``where`` for a value the processor cannot use."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{where}: key '{key}' {why}")

        if self.resample not in RESAMPLE_FILTERS:
            raise bad("resample", f"must be a PIL filter number {sorted(RESAMPLE_FILTERS)}, got {self.resample}")
        if not (math.isfinite(self.rescale_factor) and self.rescale_factor > 0):
            raise bad("rescale_factor", f"must be a positive number, got {self.rescale_factor}")
        for key in ("image_mean", "image_std"):
            values = getattr(self, key)
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise bad(key, f"must be 3 finite numbers (one per RGB channel), got {list(values)}")
        if any(v == 0 for v in self.image_std):
            raise bad("image_std", f"must not contain 0, got {list(self.image_std)}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise bad(
                "max_pixels", f"must be >= min_pixels > 0, got min_pixels {self.min_pixels}, max {self.max_pixels}"
            )
        for key, value in (("patch_size", 14), ("temporal_patch_size", 1), ("merge_size", 2)):
            if getattr(self, key) != value:
                raise bad(key, f"must be {value} (the Keye-VL 1.5 vision tower), got {getattr(self, key)}")

    # --- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The released file's mapping: identity keys first, then every field (tuples as lists)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["image_mean"], fields["image_std"] = list(self.image_mean), list(self.image_std)
        return {**json.loads(json.dumps(RELEASED_IDENTITY)), **fields}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>") -> ImageProcessorConfig:
        """Strict reading (see the module docstring): wrong types and unknown keys name the key and ``where``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object at the top level, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key in TOLERATED_KEYS:
                if key == "size" and isinstance(value, dict) and ("height" in value or "width" in value):
                    raise ConfigError(
                        f"{where}: key 'size' names a fixed height/width {value}; only min_pixels/max_pixels "
                        "resizing is supported"
                    )
                continue
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
                if close:  # a typo of a setting must not fall back silently to the default
                    raise ConfigError(f"{where}: unknown key '{key}' (did you mean '{close[0]}'?)")
                # other tools' keys (a released checkpoint's extras): not ours to reject, but said out loud
                warnings.warn(
                    f"{where}: key '{key}' is not an image-processor setting Keye uses; ignored", stacklevel=2
                )
                continue
            values[key] = _typed(key, value, known[key].type, where)
        try:
            return cls(**values)
        except ConfigError as exc:  # a value check of __post_init__: report it against the file
            raise ConfigError(str(exc).replace(_HERE, where, 1)) from None

    @classmethod
    def from_json(cls, text: str, where: str = "<json>") -> ImageProcessorConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc}") from None
        return cls.from_dict(data, where)

    # --- files -------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> ImageProcessorConfig:
        """``directory/preprocessor_config.json``, or the published defaults when the directory has none."""
        path = Path(directory) / PREPROCESSOR_CONFIG
        if not path.is_file():
            return cls()
        return cls.from_json(path.read_text(), str(path))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PREPROCESSOR_CONFIG
        path.write_text(self.to_json())
        return path


def _typed(key: str, value: Any, annotation: Any, where: str) -> Any:
    """``value`` checked against the field's JSON type: bool, int, float (an int is a float) or 3 floats."""
    kind = str(annotation)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: key '{key}' must be {expected}, got {type(value).__name__} {value!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if kind == "float":
        if not number(value):
            raise wrong("a number")
        return float(value)
    # image_mean / image_std: a list of 3 numbers, or one number for all channels (as transformers accepts)
    if number(value):
        return (float(value),) * 3
    if not isinstance(value, list) or not all(number(v) for v in value):
        raise wrong("a list of 3 numbers")
    return tuple(float(v) for v in value)
