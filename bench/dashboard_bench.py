"""How smooth the clinician's charts stay: N charts in Debian's chromium, each fed readings at
a given rate (50 Hz motion: three series per chart), through the page's own chart code
(clinic/web/static/charts.js, uPlot), for a while; prints the browser's frame intervals (p50,
p99, max), the long tasks (> 50 ms) and the points drawn.

The readings are handed to the charts in the page, 10 times a second as the live feed hands
them over, so what is measured is the drawing, not the network. `vitalproof serve` serves the
page (no Kafka needed for that).

    .venv/bin/python bench/dashboard_bench.py --charts 20 --hz 50 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright
from rich.console import Console

from vitalproof.devstack.procs import free_ports

ROOT = Path(__file__).resolve().parent.parent

PAGE_JS = """
async ({charts, hz, seconds, prefill}) => {
  const { Panel } = await import("/ui/charts.js");
  const host = document.createElement("div");
  host.className = "grid";
  document.body.append(host);
  const panels = [];
  for (let i = 0; i < charts; i++) {
    const box = document.createElement("div");
    box.className = "chart";
    host.append(box);
    panels.push(new Panel({ id: `m${i}`, title: `Motion ${i}`,
      metrics: ["accel_x", "accel_y", "accel_z"] }, box));
  }
  // What a clinician's page holds after watching for `prefill` seconds.
  let seq = 0;
  const start = Date.now() - prefill * 1000;
  for (const p of panels) {
    for (let i = 0; i < prefill * hz; i++) {
      const t_us = (start + i * (1000 / hz)) * 1000;
      for (const m of ["accel_x", "accel_y", "accel_z"]) {
        p.add(m, { t_us, value: Math.sin(seq / 20), flags: [], device: "d", seq: seq++,
                   unit: "m/s2" });
      }
    }
  }
  const held = panels.reduce((n, p) => n + p.points(), 0);
  const frames = [];
  let last = performance.now(), running = true;
  const frame = (t) => {
    frames.push(t - last); last = t; if (running) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  const longTasks = [];
  new PerformanceObserver((l) => l.getEntries().forEach((e) => longTasks.push(e.duration)))
    .observe({ type: "longtask", buffered: false });
  const t0 = Date.now();
  const feed = setInterval(() => {
    const now = Date.now();
    for (const p of panels) {
      for (let k = hz / 10; k > 0; k--) {
        const t_us = (now - (k - 1) * (1000 / hz)) * 1000;
        for (const m of ["accel_x", "accel_y", "accel_z"]) {
          p.add(m, { t_us, value: Math.sin(seq / 20), flags: seq % 997 ? [] : ["IMPLAUSIBLE"],
                     device: "d", seq: seq++, unit: "m/s2" });
        }
      }
    }
  }, 100);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  clearInterval(feed);
  running = false;
  const sorted = frames.slice(10).sort((a, b) => a - b);
  const q = (x) => sorted[Math.min(sorted.length - 1, Math.floor(x * sorted.length))];
  return { frames: sorted.length, p50: q(0.5), p99: q(0.99), max: sorted[sorted.length - 1],
           longTasks: longTasks.length, longestTask: Math.max(0, ...longTasks),
           points: panels.reduce((n, p) => n + p.points(), 0),
           added: panels.reduce((n, p) => n + p.points(), 0) - held,
           seconds: (Date.now() - t0) / 1000 };
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--charts", type=int, default=20)
    ap.add_argument("--hz", type=int, default=50, help="readings per second per series")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument(
        "--prefill", type=int, default=900, help="seconds of readings held before (default 900)"
    )
    args = ap.parse_args()
    console = Console()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("bench: chromium is not installed (apt-get install chromium)", file=sys.stderr)
        return 1
    home = Path(tempfile.mkdtemp(prefix="vp-dash-bench-"))
    (port,) = free_ports(1)
    serve = subprocess.Popen(
        [sys.executable, "-m", "vitalproof", "serve", "--port", str(port)],
        env=os.environ | {"VITALPROOF_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/ui/app.css", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url + "/ui/verify.html")  # any page: the app's CSS, then uPlot
            page.add_style_tag(url=url + "/ui/vendor/uPlot.min.css")
            page.add_script_tag(url=url + "/ui/vendor/uPlot.iife.min.js")
            with console.status(
                f"{args.charts} charts x 3 series at {args.hz} Hz for {args.seconds:g} s,"
                f" {args.prefill} s held before"
            ):
                result = page.evaluate(
                    PAGE_JS,
                    {
                        "charts": args.charts,
                        "hz": args.hz,
                        "seconds": args.seconds,
                        "prefill": args.prefill,
                    },
                )
            browser.close()
    finally:
        serve.terminate()
        serve.wait(10)
        shutil.rmtree(home, ignore_errors=True)
    rate = result["added"] / result["seconds"]
    console.print(
        f"charts {args.charts}, {args.hz} Hz x 3 series each: {rate:,.0f} points/s drawn, "
        f"{result['points']:,} held in the page\n"
        f"frame interval p50 {result['p50']:.1f} ms, p99 {result['p99']:.1f} ms, "
        f"max {result['max']:.1f} ms over {result['frames']} frames; "
        f"long tasks (>50 ms): {result['longTasks']}, longest {result['longestTask']:.0f} ms"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
