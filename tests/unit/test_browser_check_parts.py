"""`browser_check.part_problems`: what the report check says of the parts it shows on their own
(the timeline, the example users), without a browser."""
from recsys_lib.report import browser_check


def _part(**kw):
    part = {"id": "example-user-7", "width": 1170, "right": 1215, "wider_than_page": False, "min_font_px": 12.0,
            "cells": 40, "clipped_cells": 2, "image_scale": None, "text": "User 7"}
    return {**part, **kw}


def _result(**parts):
    return {"parts": {"timeline": [], "example_users": [], **parts}}


def test_a_readable_part_is_no_problem():
    ok = _result(timeline=[_part(id="timeline", cells=0, clipped_cells=0, image_scale=1.0)],
                 example_users=[_part()])
    assert browser_check.part_problems(ok, require=("timeline", "example_users")) == []


def test_each_unreadable_part_is_named():
    bad = _result(timeline=[_part(id="timeline", cells=0, image_scale=0.4)],
                  example_users=[_part(wider_than_page=True, right=1400), _part(id="example-user-8", min_font_px=8.0),
                                 _part(id="example-user-9", clipped_cells=30)])
    found = browser_check.part_problems(bad)
    assert len(found) == 4, found
    assert any("timeline" in f and "40%" in f for f in found)
    assert any("example-user-7" in f and "wider" in f for f in found)
    assert any("example-user-8" in f and "8.0 px" in f for f in found)
    assert any("example-user-9" in f and "30 of 40" in f for f in found)


def test_a_missing_part_is_a_problem_only_when_required():
    empty = _result()
    assert browser_check.part_problems(empty) == []
    assert browser_check.part_problems(empty, require=("timeline",)) == ["no timeline (figure#timeline) in the report"]
