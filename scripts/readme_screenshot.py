"""Render the Explorer for a store into an offline HTML file and screenshot it in Chromium (the README's picture).

Usage: python scripts/readme_screenshot.py STORE OUT.png [--metric unchanged_frac] [--run opd]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from opd_lens import Explorer
from opd_lens.report import export_html


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--metric", default="unchanged_frac")
    p.add_argument("--run", default="opd")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    args = p.parse_args()
    ex = Explorer(args.store, metric=args.metric)
    ex.selection = {**ex.selection, "run": args.run}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        html = export_html([ex], Path(tmp) / "explorer.html", title=f"opd_lens Explorer: {args.store.name}")
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.goto(html.as_uri())
        page.locator("canvas.opd-heat").first.wait_for()
        page.locator(".opd-explorer").screenshot(path=args.out)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
