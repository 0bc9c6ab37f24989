"""Thyme's extraction and repair passes, as pure string functions."""

from keye.sandbox.repair import (
    clamp_crop_boxes,
    clamp_span,
    extract_code,
    fix_cv_aliases,
    fix_image_path,
    fix_indentation,
    redirect_output_dir,
    repair_code,
    widen_precision,
)


def test_extract_code_fenced_plain_and_missing():
    text = "think <CODE>\n```python\nprint(1)\n```\n</code> then <code>print(2)</code>"
    assert extract_code(text) == "print(1)"
    assert extract_code("a <code>x = 3\nprint(x)</code>") == "x = 3\nprint(x)"
    assert extract_code("no code here") is None
    assert extract_code("<code>```python\n```</code>") is None


def test_fix_indentation_dedents_and_realigns_first_line():
    assert fix_indentation("    a = 1\n    print(a)") == "a = 1\nprint(a)"
    fixed = fix_indentation("a = 1\n        if a:\n            print(a)")
    compile(fixed, "<t>", "exec")
    assert fixed.splitlines()[1] == "if a:"


def test_clamp_span_keeps_min_side_inside_image():
    assert clamp_span(300, 400, 320) == (256, 320)
    assert clamp_span(50, 10, 1000) == (0, 64)
    assert clamp_span(10, 20, 40) == (0, 40)  # image smaller than 64 px: the whole side


def test_clamp_crop_boxes_all_literal_forms():
    code = (
        "c = im.crop((300, 10, 400, 20))\n"
        "bbox = [-5, -5, 2000, 100]\n"
        "x1, y1, x2, y2 = 0, 0, 10, 10\n"
        "patch = arr[10:20, 300:900]\n"
        "keep = im.crop((10, 10, 200, 150))\n"
    )
    out = clamp_crop_boxes(code, 320, 240).splitlines()
    assert out[0] == "c = im.crop((256, 0, 320, 64))"
    assert out[1] == "bbox = [0, 0, 320, 100]"
    assert out[2].endswith("= 0, 0, 64, 64")
    assert out[3] == "patch = arr[0:64, 256:320]"
    assert out[4] == "keep = im.crop((10, 10, 200, 150))"


def test_cv_aliases_and_output_dir_and_precision():
    assert fix_cv_aliases("cv.imread(p); cv3.x; cv4.y; CV.z; cv2.w; mycv.q") == (
        "cv2.imread(p); cv2.x; cv2.y; cv2.z; cv2.w; mycv.q"
    )
    assert redirect_output_dir("'/mnt/data/temp_processed_images/a.png'", "/mnt/data") == "'/mnt/data/a.png'"
    assert widen_precision("f'{x:.1f} {y:.2f}' % 1; '%.1f' % v") == "f'{x:.8f} {y:.2f}' % 1; '%.8f' % v"


def test_fix_image_path_literals():
    jail = ["/mnt/data/cat.png"]
    code = 'image_path = "/wrong/place.jpg"\nim = Image.open("/host/data/cat.png")\nb = Image.open("/data/x/cat.png")'
    out = fix_image_path(code, jail, ["/host/data/cat.png"]).splitlines()
    assert out == [
        'image_path = "/mnt/data/cat.png"',
        'im = Image.open("/mnt/data/cat.png")',
        'b = Image.open("/mnt/data/cat.png")',
    ]
    assert fix_image_path('image_path = "/mnt/data/cat.png"', jail) == 'image_path = "/mnt/data/cat.png"'


def test_repair_code_reports_applied_passes():
    code, applied = repair_code("  x = cv.imread(image_path)\n  print(x)", ["/mnt/data/a.png"], None, (100, 100))
    assert code == "x = cv2.imread(image_path)\nprint(x)"
    assert applied == ["indentation", "cv2_alias"]
    _, none = repair_code("print(1)\n", [], None, None)
    assert none == []
