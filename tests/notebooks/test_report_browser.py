"""The reader's report as a browser shows it: headless Chromium (Playwright driving the system's
chromium, nothing downloaded) opens the report the pipeline built, from file:// at 1280 px, and
finds every image decoded, no request leaving file://, no console error, the abstract, the
results table and each figure present, and nothing wider than the page. Screenshots go beside
the report (screenshots/index-1280.png and index-1280-top.png)."""
import pytest

from recsys_lib.report import browser_check

#: the figures every full run's report shows (recsys_lib.report.Captions ids in 90_report)
FIGURES = {"forest", "segments", "hit-popularity", "recall", "source-recall", "learning-curves", "search", "timing"}
TABLES = {"results", "paired", "results-valid", "tuning"}


@pytest.fixture(scope="module")
def seen(built_report):
    exe = browser_check.find_chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install -y chromium, as .ci/run does, or set "
                    "RECSYS_CHROMIUM): the report's browser check cannot run")
    return browser_check.check_report(built_report, built_report.parent / "screenshots", width=1280, executable=exe)


@pytest.mark.slow
def test_the_report_opens_offline_without_errors(seen):
    assert seen["images"] and seen["broken_images"] == [], seen["broken_images"]
    assert all(i["width"] > 0 for i in seen["images"])
    assert seen["requests_outside_file"] == [], "the report must open offline"
    assert seen["console_errors"] == []


@pytest.mark.slow
def test_the_report_shows_its_abstract_results_and_figures(seen):
    assert seen["abstract"] and "strongest single-stage model on validation" in seen["abstract"]
    assert TABLES <= set(seen["tables"]), seen["tables"]
    assert FIGURES <= set(seen["figures"]), seen["figures"]
    assert seen["uncaptioned"] == []


@pytest.mark.slow
def test_nothing_is_wider_than_the_page_at_1280_px(seen):
    assert seen["client_width"] <= 1280
    assert seen["scroll_width"] <= seen["client_width"] and seen["overflow"] == [], seen["overflow"]


@pytest.mark.slow
def test_screenshots_are_written_beside_the_report(seen, built_report):
    from PIL import Image
    shots = built_report.parent / "screenshots"
    for path in seen["screenshots"]:
        assert str(path).startswith(str(shots))
        with Image.open(path) as im:
            assert im.size[0] == 1280 and im.size[1] >= 900


@pytest.mark.slow
def test_the_timeline_and_example_users_are_shown_readable_with_their_own_screenshots(seen, built_report):
    """Issue 42's check: the protocol timeline and each example user, screenshotted on their own
    at 1,280 px, with text a reader can read and nothing wider than the page."""
    from PIL import Image
    parts = seen["parts"]
    assert len(parts["timeline"]) == 1 and parts["example_users"], parts
    assert all(p["id"].startswith("example-user-") for p in parts["example_users"])
    assert browser_check.part_problems(seen, require=("timeline", "example_users")) == []
    assert len(seen["part_screenshots"]) == 1 + len(parts["example_users"])
    for path in seen["part_screenshots"]:
        assert str(path).startswith(str(built_report.parent / "screenshots"))
        with Image.open(path) as im:
            assert 200 <= im.size[0] <= 1280 and im.size[1] >= 100
