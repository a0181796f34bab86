"""Screenshot of a report.html for the README: headless Chromium, then 128 colours (small PNG).

    python docs/screenshot_report.py runs/demo/report.html docs/report_screenshot.png
"""

import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's tests/ (a test-only helper)
from tests.browser import screenshot  # noqa: E402

if __name__ == "__main__":
    page, out = sys.argv[1], sys.argv[2]
    png = screenshot(page, out, width=1280, height=1100)
    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)
    print(f"wrote {png}")
