#!/usr/bin/env python3
"""Open a run's report.html in headless Chromium, screenshot it and check its images.

Usage: ``python scripts/check_report.py RUN_DIR_OR_HTML [--screenshot PATH] [--height N]``

Chromium (Debian package ``chromium``) renders the page twice: once with ``--dump-dom`` to get
the DOM after loading, then to a PNG screenshot of a 1280-pixel-wide window tall enough for the
whole page (headless Chromium captures the window only, so by default the height is estimated
from the embedded images and table rows; at least 4000 pixels). The DOM check
requires every ``<img>`` to carry a ``data:image/png;base64`` URI that decodes to a PNG with a
non-empty size, and no ``src``/``href`` to point outside the page. Prints one JSON object and
exits 0 when everything holds, 1 otherwise, 2 when Chromium cannot be run.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_PNG = "data:image/png;base64,"
#: Reference prefixes that stay inside the page.
LOCAL_PREFIXES = ("data:", "#", "about:blank", "javascript:void")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars",
)


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "img":
            self.images.append({"src": attrs.get("src") or "", "alt": attrs.get("alt") or ""})
        for name in ("src", "href", "srcset", "poster", "data"):
            if attrs.get(name):
                self.refs.append((tag, name, attrs[name]))


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def inspect_dom(dom: str) -> dict:
    """Check a page's DOM: every image an embedded, decodable PNG; no external references."""
    parser = _Collector()
    parser.feed(dom)
    images = []
    for img in parser.images:
        src = img["src"]
        entry = {"alt": img["alt"], "data_uri": src.startswith(DATA_PNG), "width": 0, "height": 0}
        if entry["data_uri"]:
            try:
                size = png_size(base64.b64decode(src[len(DATA_PNG):], validate=True))
            except (binascii.Error, ValueError):
                size = None
            if size:
                entry["width"], entry["height"] = size
        entry["ok"] = entry["data_uri"] and entry["width"] > 0 and entry["height"] > 0
        images.append(entry)
    external = [f"<{tag} {name}={value[:80]}>" for tag, name, value in parser.refs
                if not value.strip().lower().startswith(LOCAL_PREFIXES)]
    return {
        "images": len(images),
        "images_ok": sum(e["ok"] for e in images),
        "image_details": images,
        "external_refs": external,
        "ok": bool(images) and all(e["ok"] for e in images) and not external,
    }


def estimate_height(dom: str, checked: dict, width: int, *, content: int = 1020, cap: int = 16000) -> int:
    """Window height that shows the whole report: images at their displayed size, tables, text."""
    images = sum(
        e["height"] * min(1.0, content / e["width"]) + 90 for e in checked["image_details"] if e["width"]
    )
    rows = dom.count("<tr")
    return int(min(cap, max(4000, 700 + images + 34 * rows)))


def find_html(target: Path) -> Path:
    """The report page: ``target`` itself or ``target/report.html``."""
    page = target / "report.html" if target.is_dir() else target
    if not page.is_file():
        raise FileNotFoundError(f"no report at {page}; build one with bmrs_pyro.analysis.build_report(RUN_DIR)")
    return page


def find_chromium(explicit: str | None = None) -> str:
    """Path of the Chromium binary, or FileNotFoundError saying how to install it."""
    for candidate in (explicit, "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    raise FileNotFoundError("Chromium not found: apt-get update && apt-get install -y chromium")


def run_chromium(chromium: str, page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` with a throw-away profile."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="run folder or report.html")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG path (default: next to the page)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=None, help="window height (default: whole page, >= 4000)")
    parser.add_argument("--chromium", default=None, help="Chromium binary")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)

    page = find_html(args.target)
    try:
        chromium = find_chromium(args.chromium)
    except FileNotFoundError as err:
        print(json.dumps({"html": str(page), "ok": False, "error": str(err)}))
        return 2
    shot = args.screenshot or page.with_name(page.stem + "_screenshot.png")
    dumped = run_chromium(chromium, page, ["--dump-dom", "--virtual-time-budget=5000",
                                           f"--window-size={args.width},4000"], args.timeout)
    result = {"html": str(page), "html_bytes": page.stat().st_size, "screenshot": str(shot)}
    if dumped.returncode != 0 or not dumped.stdout.strip():
        result.update(ok=False, error=f"chromium --dump-dom failed ({dumped.returncode}): {dumped.stderr[-500:]}")
        print(json.dumps(result, indent=2))
        return 1
    dom = inspect_dom(dumped.stdout)
    height = args.height or estimate_height(dumped.stdout, dom, args.width)
    if shot.exists():
        shot.unlink()  # a stale screenshot must not pass for a new one
    run_chromium(chromium, page, [f"--screenshot={shot.resolve()}", f"--window-size={args.width},{height}"], args.timeout)
    shot_size = png_size(shot.read_bytes()) if shot.is_file() else None
    result["screenshot_size"] = list(shot_size) if shot_size else None
    result.update(dom)
    result["ok"] = dom["ok"] and shot_size is not None
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
