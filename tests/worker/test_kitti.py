"""KITTI label parsing: TAO's rows, plus every unusable line reported with its number and reason."""

from __future__ import annotations

import pytest

from worker.kitti import cap_boxes, decode_label_bytes, parse_kitti


def kitti_line(kind, x1, y1, x2, y2):
    """A 15-field line as TAO's test helper ``_write_kitti`` writes it."""
    return f"{kind} 0.00 0 0.00 {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f} 0.00 0.00 0.00 0.00 0.00 0.00 0.00\n"


def parse(text, width=1000, height=1000, **kw):
    return parse_kitti(text, width=width, height=height, **kw)


def test_parses_rows_like_tao():
    text = kitti_line("Car", 100, 200, 300, 400) + kitti_line("Pedestrian", 50, 60, 70, 90)
    out = parse(text)
    assert out.boxes == [
        {"type": "Car", "bbox": [100.0, 200.0, 300.0, 400.0]},
        {"type": "Pedestrian", "bbox": [50.0, 60.0, 70.0, 90.0]},
    ]
    assert out.skipped == []
    assert out.ignored == 0


def test_fractional_coordinates_kept_to_two_decimals():
    out = parse("Car 0 0 0 10.126 20.5 30.999 40.0 0 0 0 0 0 0 0\n")
    assert out.boxes[0]["bbox"] == [10.13, 20.5, 31.0, 40.0]


def test_type_case_preserved():
    assert parse(kitti_line("cyclist", 1, 2, 3, 4)).boxes[0]["type"] == "cyclist"


def test_exactly_eight_fields_is_enough():
    out = parse("Car 0 0 0 1 2 3 4\n")
    assert out.boxes == [{"type": "Car", "bbox": [1.0, 2.0, 3.0, 4.0]}]


def test_short_lines_skipped_with_line_numbers():
    # TAO: "Car 0.0 0\n" -> []
    text = "Car 0.0 0\n" + kitti_line("Van", 10, 10, 20, 20) + "Truck 1 2 3 4 5 6\n"
    out = parse(text)
    assert [b["type"] for b in out.boxes] == ["Van"]
    assert [s.line for s in out.skipped] == [1, 3]
    assert "3 fields" in out.skipped[0].reason
    assert "7 fields" in out.skipped[1].reason
    assert out.skipped[0].text == "Car 0.0 0"


def test_blank_lines_are_not_reported_but_count_for_numbering():
    text = "\n\n" + "Car 0.0 0\n"
    out = parse(text)
    assert out.boxes == []
    assert [s.line for s in out.skipped] == [3]


def test_dontcare_dropped_and_counted():
    text = kitti_line("DontCare", 0, 0, 10, 10) + kitti_line("Car", 1, 2, 3, 4) + kitti_line("DontCare", 5, 5, 9, 9)
    out = parse(text)
    assert [b["type"] for b in out.boxes] == ["Car"]
    assert out.ignored == 2
    assert out.skipped == []


def test_ignore_types_configurable():
    text = kitti_line("DontCare", 0, 0, 10, 10) + kitti_line("Misc", 1, 2, 3, 4)
    out = parse(text, ignore_types=["Misc"])
    assert [b["type"] for b in out.boxes] == ["DontCare"]
    assert out.ignored == 1
    out = parse(text, ignore_types=[])
    assert len(out.boxes) == 2 and out.ignored == 0


def test_boxes_clipped_to_image():
    out = parse(kitti_line("Car", -10, -5, 700, 500), width=640, height=480)
    assert out.boxes[0]["bbox"] == [0.0, 0.0, 640.0, 480.0]


def test_zero_area_after_clipping_skipped():
    # entirely to the right of a 640-wide image
    out = parse(kitti_line("Car", 650, 10, 700, 20), width=640, height=480)
    assert out.boxes == []
    assert len(out.skipped) == 1
    assert out.skipped[0].line == 1
    assert "no area" in out.skipped[0].reason


def test_degenerate_box_skipped():
    out = parse(kitti_line("Car", 10, 10, 10, 20))
    assert out.boxes == []
    assert "no area" in out.skipped[0].reason


@pytest.mark.parametrize(
    ("coords", "reason"),
    [
        ("nan 2 3 4", "NaN"),
        ("1 2 inf 4", "infinite"),
        ("1 -inf 3 4", "infinite"),
        ("1 2 abc 4", "non-numeric"),
        ("1 2 3 4,5", "non-numeric"),
    ],
)
def test_bad_numbers_skipped_with_reason(coords, reason):
    text = kitti_line("Car", 1, 1, 5, 5) + f"Car 0 0 0 {coords} 0 0 0 0 0 0 0\n"
    out = parse(text)
    assert len(out.boxes) == 1
    assert len(out.skipped) == 1
    assert out.skipped[0].line == 2
    assert reason in out.skipped[0].reason


def test_inverted_box_skipped():
    out = parse(kitti_line("Car", 300, 200, 100, 400) + kitti_line("Car", 100, 400, 300, 200))
    assert out.boxes == []
    assert [s.line for s in out.skipped] == [1, 2]
    assert all("inverted" in s.reason for s in out.skipped)


def test_tabs_and_crlf():
    text = "Car\t0\t0\t0\t100\t200\t300\t400\t0\t0\t0\t0\t0\t0\t0\r\nVan 0 0 0 1 2 3 4 0 0 0 0 0 0 0\r\n"
    out = parse(text)
    assert out.boxes == [
        {"type": "Car", "bbox": [100.0, 200.0, 300.0, 400.0]},
        {"type": "Van", "bbox": [1.0, 2.0, 3.0, 4.0]},
    ]
    assert out.skipped == []


def test_no_trailing_newline():
    out = parse("Car 0 0 0 1 2 3 4 0 0 0 0 0 0 0")
    assert len(out.boxes) == 1


def test_empty_text():
    out = parse("")
    assert out.boxes == [] and out.skipped == [] and out.ignored == 0


def test_skipped_text_is_truncated():
    long = "x" * 1000
    out = parse(long + "\n")
    assert len(out.skipped[0].text) == 200


def test_decode_label_bytes_utf8():
    assert decode_label_bytes("Café 0 0 0 1 2 3 4".encode()) == "Café 0 0 0 1 2 3 4"


def test_decode_label_bytes_latin1_fallback():
    data = "Café 0 0 0 1 2 3 4\n".encode("latin-1")
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    text = decode_label_bytes(data)
    assert text.startswith("Café")
    out = parse(text)
    assert out.boxes == [{"type": "Café", "bbox": [1.0, 2.0, 3.0, 4.0]}]


# --------------------------------------------------------------------------- BOM, type case, box cap (issue 13)


def test_utf8_bom_is_dropped_so_the_first_type_reads_clean():
    raw = "\ufeff".encode() + (kitti_line("Car", 1, 2, 30, 40) + kitti_line("Van", 5, 5, 9, 9)).encode()
    out = parse(decode_label_bytes(raw))
    assert [b["type"] for b in out.boxes] == ["Car", "Van"]


def test_bom_on_a_first_dontcare_line_is_still_ignored():
    raw = "\ufeff".encode() + (kitti_line("DontCare", 1, 2, 30, 40) + kitti_line("Car", 5, 5, 9, 9)).encode()
    out = parse(decode_label_bytes(raw))
    assert [b["type"] for b in out.boxes] == ["Car"] and out.ignored == 1


def test_bom_in_front_of_latin1_text_is_dropped_too():
    raw = b"\xef\xbb\xbf" + kitti_line("Caf\xe9", 1, 2, 30, 40).encode("latin-1")
    assert parse(decode_label_bytes(raw)).boxes[0]["type"] == "Café"


def test_bom_in_text_given_directly_is_dropped():
    assert parse("\ufeff" + kitti_line("Car", 1, 2, 30, 40)).boxes[0]["type"] == "Car"


@pytest.mark.parametrize("written", ["dontcare", "DONTCARE", "DontCare", "dontCare"])
def test_ignore_types_match_any_case(written):
    out = parse(kitti_line(written, 1, 2, 30, 40) + kitti_line("Car", 5, 5, 9, 9))
    assert [b["type"] for b in out.boxes] == ["Car"] and out.ignored == 1


@pytest.mark.parametrize("ignore", [["dontcare"], [" DontCare "], ["\ufeffDontCare"], ["DONTCARE\n"]])
def test_ignore_types_as_users_write_them(ignore):
    out = parse(kitti_line("DontCare", 1, 2, 30, 40) + kitti_line("Car", 5, 5, 9, 9), ignore_types=ignore)
    assert [b["type"] for b in out.boxes] == ["Car"]


def test_kept_types_keep_the_case_of_the_file():
    out = parse(kitti_line("car", 1, 2, 30, 40), ignore_types=["Van"])
    assert out.boxes[0]["type"] == "car"


def test_cap_boxes_keeps_the_largest_in_their_order():
    rows = [[0, 0, 10, 10, "a"], [0, 0, 100, 100, "big"], [0, 0, 1, 1, "tiny"], [0, 0, 50, 50, "mid"]]
    kept, dropped = cap_boxes(rows, 2)
    assert kept == [[0, 0, 100, 100, "big"], [0, 0, 50, 50, "mid"]] and dropped == 2
    dicts = [{"type": r[4], "bbox": r[:4]} for r in rows]
    kept, dropped = cap_boxes(dicts, 3)
    assert [d["type"] for d in kept] == ["a", "big", "mid"] and dropped == 1
    assert cap_boxes(rows, 4) == (rows, 0)
