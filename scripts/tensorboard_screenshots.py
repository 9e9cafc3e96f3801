"""Screenshots of TensorBoard on a run or sweep folder, for docs/ (headless Chromium).

    python scripts/tensorboard_screenshots.py runs/train/multirun/<sweep> docs/tensorboard

Starts `tensorboard --logdir DIR` on a free port, opens it in headless Chromium through
Playwright (`pip install playwright`; the browser is the system's, e.g. Debian's `chromium`,
or give --chromium PATH), and saves one PNG per view: Time Series, Text, HParams (table and
parallel coordinates) and Projector. `--views images histograms custom_scalars` takes the
pictures of docs/diagnostics.md instead (`--tag-filter REGEX` shows only the matching tags of
Images and Histograms, `--actual-size` shows images unscaled, `--prefix NAME_` names the
files). Not a dependency of lmlab: a tool for its docs.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

VIEWS = {
    "time_series": "#timeseries",
    "text": "#text",
    "hparams_table": "#hparams",
    "hparams_parallel": "#hparams",
    "projector": "#projector",
    # the model diagnostics (lmlab.diagnostics): not taken unless asked for
    "images": "#images",
    "histograms": "#histograms",
    "custom_scalars": "#custom_scalars",
}
DEFAULT_VIEWS = ["time_series", "text", "hparams_table", "hparams_parallel", "projector"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"tensorboard did not answer at {url} in {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--views", nargs="*", default=DEFAULT_VIEWS, choices=list(VIEWS))
    parser.add_argument("--size", default="1500x950", help="window WIDTHxHEIGHT")
    parser.add_argument("--tag-filter", default="", help="regex of the tags shown")
    parser.add_argument("--actual-size", action="store_true", help="images not scaled down")
    parser.add_argument("--prefix", default="", help="put before each PNG's name")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    width, height = (int(n) for n in args.size.split("x"))
    port = free_port()
    tensorboard = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    server = subprocess.Popen(
        [tensorboard, "--logdir", str(args.logdir), "--port", str(port), "--bind_all"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://localhost:{port}/"
        wait_for(base)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            for view in args.views:
                url = base + VIEWS[view]
                if args.tag_filter and view in ("images", "histograms"):
                    url += "&tagFilter=" + urllib.parse.quote(args.tag_filter, safe="")
                page.goto(url)
                page.wait_for_timeout(6000)  # the dashboards load their data after the page
                if view == "images" and args.actual_size:
                    page.get_by_text("Show actual image size").click()
                    page.wait_for_timeout(2000)
                if view == "custom_scalars":  # raw values, every point in the chart
                    smoothing = page.locator("input[type=number]").first
                    smoothing.fill("0")
                    smoothing.press("Enter")
                    page.get_by_text("Ignore outliers in chart scaling").click()
                    page.wait_for_timeout(1500)
                if view == "hparams_parallel":
                    page.get_by_text("PARALLEL COORDINATES VIEW").click()
                    page.wait_for_timeout(3000)
                path = args.out / f"{args.prefix}{view}.png"
                page.screenshot(path=str(path))
                print(path)
            browser.close()
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
