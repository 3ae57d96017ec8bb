"""Open a rendered report in headless Chromium and check what a reader would see.

    python -m recsys_lib.report.browser_check reports/ml-latest-small/index.html   # prints JSON, exit 1 on a problem

Playwright (pinned in requirements.txt) drives the system's Chromium (Debian's ``chromium``
package, or ``$RECSYS_CHROMIUM``): no browser is downloaded. The page is opened from ``file://``
at 1280 px; every request that would leave ``file://`` (or an inline ``data:`` image) is recorded
and aborted. The check collects: images that do not decode (naturalWidth 0), requests that left
the file, console errors and page errors, elements wider than the page, the abstract's text and
the ids of the captioned figures and tables; and writes screenshots of the page (the whole page
and its first screen) beside the report, under ``screenshots/``.

Two parts a reader looks at rather than reads get their own screenshot and checks (`SHOWN`): the
protocol timeline (``#timeline``, its image's shown width against its drawn width, so that its
labels are not shrunk past reading) and each example user (``section.rs-ex-user``: the smallest
font in it, the share of its table cells cut by an ellipsis, and whether it is wider than the
page). A report without them is a problem (`problems`) only when asked for (``--require``).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_INSPECT = """() => {
  const W = document.documentElement.clientWidth;
  const describe = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
      (typeof el.className === 'string' && el.className ? '.' + el.className.trim().split(/\\s+/).join('.') : '');
  const overflow = [];
  for (const el of document.querySelectorAll('body *')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && r.right > W + 1) overflow.push(describe(el) + ' right=' + Math.round(r.right));
  }
  const images = [...document.images].map(i => ({src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0,
                                                width: i.naturalWidth}));
  const abstract = document.querySelector('#abstract');
  return {client_width: W, scroll_width: document.documentElement.scrollWidth, overflow: overflow.slice(0, 25),
          images: images,
          figures: [...document.querySelectorAll('figure.rs-figure')].filter(f => f.querySelector('img')).map(f => f.id),
          tables: [...document.querySelectorAll('table.rs-table')].map(t => t.id).filter(Boolean),
          uncaptioned: [...document.querySelectorAll('figure.rs-figure')].filter(f => !f.querySelector('figcaption')).map(f => f.id),
          abstract: abstract ? abstract.innerText : null,
          text: document.body.innerText.length};
}"""


#: the parts of the report screenshotted and checked on their own: name -> CSS selector
SHOWN = {"timeline": "figure#timeline", "example_users": "section.rs-ex-user"}
MIN_FONT_PX = 10.0        # smaller text is not readable on a 1,280 px screen
MIN_IMAGE_SCALE = 0.6     # a figure shown at under 60% of its drawn width has unreadable labels
MAX_CLIPPED_SHARE = 0.5   # at most half of an example's cells may be cut by an ellipsis (titles keep a hover)

_INSPECT_PART = """el => {
  const W = document.documentElement.clientWidth;
  const r = el.getBoundingClientRect();
  let minFont = Infinity, cells = 0, clipped = 0;
  for (const t of [el, ...el.querySelectorAll('*')]) {
    const own = [...t.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (own) minFont = Math.min(minFont, parseFloat(getComputedStyle(t).fontSize));
  }
  for (const td of el.querySelectorAll('td')) {
    if (!td.textContent.trim()) continue;
    cells += 1;
    if (td.scrollWidth > td.clientWidth + 1) clipped += 1;
  }
  const img = el.querySelector('img');
  return {id: el.id, width: Math.round(r.width), right: Math.round(r.right), wider_than_page: r.right > W + 1,
          min_font_px: minFont === Infinity ? null : minFont, cells: cells, clipped_cells: clipped,
          image_scale: img && img.naturalWidth ? img.getBoundingClientRect().width / img.naturalWidth : null,
          text: el.innerText.slice(0, 200)};
}"""


def find_chromium() -> str | None:
    """The Chromium to drive: ``$RECSYS_CHROMIUM`` if set, else the first of chromium,
    chromium-browser, google-chrome on PATH; None when there is none."""
    env = os.environ.get("RECSYS_CHROMIUM")
    if env:
        return env if Path(env).exists() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def check_report(index: str | os.PathLike, screenshot_dir: str | os.PathLike | None = None,
                 width: int = 1280, height: int = 900, executable: str | None = None,
                 timeout_ms: int = 60_000) -> dict:
    """Open ``index`` in headless Chromium at ``width`` px and report what a reader would meet
    (see the module docstring); screenshots go to ``screenshot_dir`` (default: ``screenshots/``
    beside the report). Raises RuntimeError when no Chromium is found."""
    from playwright.sync_api import sync_playwright
    index = Path(index).resolve()
    exe = executable or find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found: install Debian's chromium (apt-get install -y chromium) "
                           "or point RECSYS_CHROMIUM at one")
    shots = Path(screenshot_dir) if screenshot_dir else index.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    requests, outside, errors = [], [], []

    def route(r):
        url = r.request.url
        if url.startswith(("file://", "data:")):
            r.continue_()
        else:
            outside.append(url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.route("**/*", route)
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(index.as_uri(), wait_until="load", timeout=timeout_ms)
            page.wait_for_load_state("networkidle", timeout=timeout_ms)
            found = page.evaluate(_INSPECT)
            full, top = shots / f"index-{width}.png", shots / f"index-{width}-top.png"
            page.screenshot(path=str(full), full_page=True)
            page.screenshot(path=str(top))
            parts, part_shots = {}, []
            for name, selector in SHOWN.items():
                parts[name] = []
                for i, element in enumerate(page.locator(selector).all()):
                    element.scroll_into_view_if_needed(timeout=timeout_ms)
                    parts[name].append(element.evaluate(_INSPECT_PART))
                    path = shots / f"{name}-{i + 1}-{width}.png"
                    element.screenshot(path=str(path), timeout=timeout_ms)
                    part_shots.append(str(path))
        finally:
            browser.close()
    left = sorted({u for u in requests if not u.startswith(("file://", "data:"))} | set(outside))
    return {"index": str(index), "chromium": exe, "width": width, **found,
            "broken_images": [i["src"] for i in found["images"] if not i["ok"]],
            "requests_outside_file": left, "console_errors": errors,
            "requests": len(requests), "screenshots": [str(full), str(top)], "parts": parts,
            "part_screenshots": part_shots}


def part_problems(result: dict, require: tuple[str, ...] = ()) -> list[str]:
    """What a reader would stumble on in the parts shown on their own (`SHOWN`): a required part
    missing, a part wider than the page, text under `MIN_FONT_PX`, a figure shrunk under
    `MIN_IMAGE_SCALE`, or an example with more than `MAX_CLIPPED_SHARE` of its cells cut."""
    out = []
    for name in require:
        if not result["parts"].get(name):
            out.append(f"no {name} ({SHOWN[name]}) in the report")
    for name, found in result["parts"].items():
        for part in found:
            where = f"{name} {part['id'] or ''}".strip()
            if part["wider_than_page"]:
                out.append(f"{where} is wider than the page (right edge {part['right']} px)")
            if part["min_font_px"] is not None and part["min_font_px"] < MIN_FONT_PX:
                out.append(f"{where} has text at {part['min_font_px']:.1f} px (< {MIN_FONT_PX:g} px)")
            if part["image_scale"] is not None and part["image_scale"] < MIN_IMAGE_SCALE:
                out.append(f"{where}'s image is shown at {part['image_scale']:.0%} of its drawn width")
            if part["cells"] and part["clipped_cells"] > MAX_CLIPPED_SHARE * part["cells"]:
                out.append(f"{where}: {part['clipped_cells']} of {part['cells']} cells cut by an ellipsis")
    return out


def problems(result: dict, require: tuple[str, ...] = ()) -> list[str]:
    """What a reader would stumble on, in words (empty when the page is fine); ``require`` names
    parts of `SHOWN` the report must have."""
    out = part_problems(result, require) if "parts" in result else []
    if result["broken_images"]:
        out.append(f"images that do not decode: {result['broken_images']}")
    if result["requests_outside_file"]:
        out.append(f"requests leaving file://: {result['requests_outside_file']}")
    if result["console_errors"]:
        out.append(f"console errors: {result['console_errors']}")
    if result["scroll_width"] > result["client_width"] or result["overflow"]:
        out.append(f"wider than {result['client_width']} px ({result['scroll_width']} px): {result['overflow']}")
    if result["uncaptioned"]:
        out.append(f"figures without a caption: {result['uncaptioned']}")
    if not result["abstract"]:
        out.append("no abstract (#abstract)")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m recsys_lib.report.browser_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="a rendered report, e.g. reports/synthetic/index.html")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--screenshots", default=None, help="folder for the screenshots (default: beside the report)")
    parser.add_argument("--require", default="", help=f"comma-separated parts the report must show, of {sorted(SHOWN)}")
    args = parser.parse_args(argv)
    require = tuple(n for n in args.require.split(",") if n)
    unknown = sorted(set(require) - set(SHOWN))
    if unknown:
        parser.error(f"--require: unknown part(s) {unknown}; valid: {sorted(SHOWN)}")
    result = check_report(args.index, args.screenshots, width=args.width)
    result.pop("images")
    print(json.dumps(result, indent=1))
    found = problems(result, require)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
