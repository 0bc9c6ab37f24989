"""Thyme's code extraction and repair passes: make the model's usual slips run instead of failing.

Thyme's paper credits much of its execution success rate to these rewrites, so they run before every block. Each
pass is a pure ``str -> str`` function; :func:`repair_code` applies them in Thyme's order and names the ones that
changed something (logged with the result, useful when reading rollouts).
"""

from __future__ import annotations

import os
import re
import textwrap

CANONICAL_OUTPUT_DIR = "/mnt/data/temp_processed_images"
MIN_CROP_SIDE = 64

_CODE_RE = re.compile(r"<code>\s*(?:```[ \t]*(?:python3?|py)?[ \t]*\n)?(.*?)\s*(?:```\s*)?</code>", re.I | re.S)
_NUM = r"-?\d+(?:\.\d+)?"
_BOX4 = rf"\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})[ \t]*,?[ \t]*"
_CROP_CALL_RE = re.compile(rf"(\.crop\(\s*)([\(\[]){_BOX4}([\)\]])")
_BOX_ASSIGN_RE = re.compile(rf"(\b\w*(?:bbox|box|crop|roi|region|rect)\w*\s*=\s*)([\(\[]){_BOX4}([\)\]])", re.I)
_XY_NAMES = r"(?:x1|left|xmin|x_min|x0|start_x)\s*,\s*(?:y1|top|ymin|y_min|y0|start_y)\s*,\s*(?:x2|right|xmax|x_max|x1|end_x)\s*,\s*(?:y2|bottom|ymax|y_max|y1|end_y)"
_TUPLE_ASSIGN_RE = re.compile(rf"(^[ \t]*{_XY_NAMES}\s*=\s*)(\(?){_BOX4}(\)?)", re.M)
_SLICE_RE = re.compile(r"\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*(,\s*:\s*)?\]")
_CV_RE = re.compile(r"(?<![\w.])(?:cv|cv3|cv4|CV)\.")
_IMAGE_PATH_RE = re.compile(r"^([ \t]*image_path\s*=\s*)([rbuRBU]?)(['\"])([^'\"\n]*)\3", re.M)
_ONE_DECIMAL_RE = re.compile(r"(\{[^{}\n]*?:[^{}\n]*?\.)1f\}|(%\.)1f")


def extract_code(text: str) -> str | None:
    """The body of the first ``<code>…</code>`` block (an optional ```python fence is removed), else ``None``."""
    match = _CODE_RE.search(text or "")
    if match is None:
        return None
    body = match.group(1)
    return body if body.strip() else None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<code>", "exec")
    except SyntaxError:
        return False
    return True


def fix_indentation(code: str) -> str:
    """Tabs to spaces, dedent, and re-align a first line that lost the indentation the rest of the block has."""
    code = code.expandtabs(4).strip("\n")
    candidates = [textwrap.dedent(code)]
    lines = code.splitlines()
    if len(lines) > 1:
        rest = textwrap.dedent("\n".join(lines[1:]))
        candidates.append(lines[0].strip() + "\n" + rest)
    for cand in candidates:
        if _compiles(cand):
            return cand
    # Last resort for stray indentation: strip it from lines that start a new top-level statement after a blank.
    flat = "\n".join(line.strip() for line in lines)
    if _compiles(flat):
        return flat
    return candidates[0]


def fix_image_path(code: str, jail_paths: list[str], host_paths: list[str] | None = None) -> str:
    """Point literal paths at the jailed copies: the host path, a same-named file elsewhere, or a wrong ``image_path``."""
    if not jail_paths:
        return code
    host_paths = host_paths or []
    by_name = {os.path.basename(p): p for p in jail_paths}
    for host, jail in zip(host_paths, jail_paths):
        if host and host != jail:
            code = re.sub(r"(['\"])" + re.escape(host) + r"\1", lambda m, j=jail: m.group(1) + j + m.group(1), code)

    def literal(m: re.Match) -> str:
        value = m.group(2)
        if value in jail_paths or not value.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")):
            return m.group(0)
        name = os.path.basename(value)
        return m.group(1) + by_name[name] + m.group(1) if name in by_name else m.group(0)

    code = re.sub(r"(['\"])(/[^'\"\n]+)\1", literal, code)

    def assign(m: re.Match) -> str:
        value = m.group(4)
        if value in jail_paths:
            return m.group(0)
        return f"{m.group(1)}{m.group(3)}{jail_paths[0]}{m.group(3)}"

    return _IMAGE_PATH_RE.sub(assign, code)


def _fmt(v: float, like: str) -> str:
    return str(int(round(v))) if "." not in like else f"{v:.1f}"


def clamp_span(lo: float, hi: float, size: int, min_side: int = MIN_CROP_SIDE) -> tuple[float, float]:
    """Clamp ``[lo, hi)`` into ``[0, size]``, widening about its centre to at least ``min_side`` (or ``size``)."""
    lo, hi = sorted((lo, hi))
    lo, hi = max(0.0, min(lo, size)), max(0.0, min(hi, size))
    need = min(min_side, size)
    if hi - lo < need:
        centre = (lo + hi) / 2
        lo = min(max(0.0, centre - need / 2), size - need)
        hi = lo + need
    return lo, hi


def clamp_crop_boxes(code: str, width: int, height: int, min_side: int = MIN_CROP_SIDE) -> str:
    """Clamp literal crop boxes (``.crop((…))``, ``bbox = (…)``, ``x1, y1, x2, y2 = …``, ``img[y1:y2, x1:x2]``)."""
    if width <= 0 or height <= 0:
        return code

    def box(m: re.Match) -> str:
        raw = [m.group(i) for i in (3, 4, 5, 6)]
        x1, y1, x2, y2 = (float(v) for v in raw)
        x1, x2 = clamp_span(x1, x2, width, min_side)
        y1, y2 = clamp_span(y1, y2, height, min_side)
        vals = ", ".join(_fmt(v, r) for v, r in zip((x1, y1, x2, y2), raw))
        return f"{m.group(1)}{m.group(2)}{vals}{m.group(7)}"

    def slice_(m: re.Match) -> str:
        y1, y2 = clamp_span(float(m.group(1)), float(m.group(2)), height, min_side)
        x1, x2 = clamp_span(float(m.group(3)), float(m.group(4)), width, min_side)
        tail = m.group(5) or ""
        return f"[{int(y1)}:{int(y2)}, {int(x1)}:{int(x2)}{tail}]"

    for pattern in (_CROP_CALL_RE, _BOX_ASSIGN_RE, _TUPLE_ASSIGN_RE):
        code = pattern.sub(box, code)
    return _SLICE_RE.sub(slice_, code)


def fix_cv_aliases(code: str) -> str:
    """``cv.``, ``cv3.``, ``cv4.`` and ``CV.`` → ``cv2.`` (the sandbox pre-imports only ``cv2``)."""
    return _CV_RE.sub("cv2.", code)


def redirect_output_dir(code: str, workdir: str) -> str:
    """Thyme tells the model to save under ``/mnt/data/temp_processed_images/``; that is the work dir here."""
    return code.replace(CANONICAL_OUTPUT_DIR, workdir.rstrip("/"))


def widen_precision(code: str) -> str:
    """One-decimal format specs lose answers to measurement questions; Thyme prints 8 decimals instead."""
    return _ONE_DECIMAL_RE.sub(lambda m: (m.group(1) or m.group(2)) + "8f" + ("}" if m.group(1) else ""), code)


def repair_code(
    code: str,
    jail_paths: list[str],
    host_paths: list[str] | None = None,
    image_size: tuple[int, int] | None = None,
    workdir: str = "/work",
) -> tuple[str, list[str]]:
    """All passes in Thyme's order; returns the code and the names of the passes that changed it."""
    passes = [
        ("indentation", fix_indentation),
        ("image_path", lambda c: fix_image_path(c, jail_paths, host_paths)),
        ("crop_clamp", lambda c: clamp_crop_boxes(c, *image_size) if image_size else c),
        ("cv2_alias", fix_cv_aliases),
        ("output_dir", lambda c: redirect_output_dir(c, workdir)),
        ("precision", widen_precision),
    ]
    applied = []
    code = code.expandtabs(4).strip("\n")
    for name, fn in passes:
        new = fn(code)
        if new != code:
            applied.append(name)
            code = new
    return code, applied
