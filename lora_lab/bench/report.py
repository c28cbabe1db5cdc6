"""``python -m lora_lab.bench report``: how long a big study's report takes to build and to open.

It runs a small real sweep (the tiny model: 2 trials x 3 epochs x strengths 0 / 0.5 / 1 x
2 prompts x 2 seeds), copies its trials until the study has ``--trials`` of them, then times
the report's first build, a rebuild after one more trial (what a running sweep pays after each
trial), and the front page's load in headless Chromium (navigation start to the load event,
every image decoded), with the page's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

TARGET_LOAD_S = 2.0


def _grow(study: Path, trials: int) -> None:
    """Copy the study's trials (renumbered) until it has ``trials`` of them."""
    sources = sorted(study.glob("trial_*"), key=lambda p: int(p.name.split("_")[1]))
    for n in range(len(sources), trials):
        src = sources[n % len(sources)]
        dst = study / f"trial_{n}"
        shutil.copytree(src, dst)
        info = json.loads((dst / "trial.json").read_text())
        (dst / "trial.json").write_text(json.dumps({**info, "number": n}))
        for name in ("scores.csv", "verdict.json"):  # the copy's own images and files
            (dst / name).write_text((dst / name).read_text().replace(f"{src}/", f"{dst}/"))
    definition = json.loads((study / "study.json").read_text())
    (study / "study.json").write_text(json.dumps({**definition, "total_trials": trials}))


def _load_in_chromium(index: Path) -> Dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000", "--no-first-run"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(index.as_uri())  # returns after the load event
        timing = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0];"
            "const imgs = Array.from(document.images);"
            "return [t.loadEventEnd, t.domContentLoadedEventEnd, imgs.length,"
            " imgs.filter(i => i.complete && i.naturalWidth > 0).length,"
            " imgs.filter(i => i.loading === 'lazy').length];")
    finally:
        driver.quit()
    load_ms, dom_ms, images, decoded, lazy = timing
    return {"load_s": load_ms / 1000, "dom_ready_s": dom_ms / 1000, "images": images, "decoded": decoded,
            "lazy": lazy}


def run(argv) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m lora_lab.bench report", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--cache-dir", default="sweeps/.cache")
    parser.add_argument("--out", default="sweeps/bench")
    args = parser.parse_args(argv)
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        raise SystemExit("error: bench report needs Debian's chromium and chromium-driver "
                         "(apt-get install chromium chromium-driver)")
    root = Path(args.out).resolve() / "report"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cmd = [sys.executable, "-m", "lora_lab.sweep", "+sweep=smoke", "sweep.name=big", f"sweep.root={root}",
           f"sweep.reports={root / 'reports'}", f"cache_dir={Path(args.cache_dir).resolve()}",
           "sweep.fixed={train.epochs:3,train.resolution:32,data.repeats:1}", "eval.seeds=[1,2]"]
    print(f"a 2-trial sweep, copied to {args.trials} trials ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the sweep failed:\n{proc.stderr[-3000:]}")
    study = root / "big"
    _grow(study, args.trials)
    from lora_lab.report.study import build_report

    shutil.rmtree(root / "reports", ignore_errors=True)
    t = time.perf_counter()
    index = build_report(study, root / "reports")
    first = time.perf_counter() - t
    _grow(study, args.trials + 1)  # one more trial finishes: what a running sweep rebuilds
    t = time.perf_counter()
    index = build_report(study, root / "reports")
    again = time.perf_counter() - t
    page = _load_in_chromium(index)
    report_dir = index.parent
    size = {"index_kb": index.stat().st_size / 1024,
            "thumbs_kb": sum(p.stat().st_size for p in (report_dir / "thumbs").glob("*")) / 1024,
            "thumbs": len(list((report_dir / "thumbs").glob("*"))),
            "all_mb": sum(p.stat().st_size for p in report_dir.rglob("*") if p.is_file()) / 2**20}
    result = {"trials": args.trials + 1, "first_build_s": first, "rebuild_s": again, "page": page, "size": size}
    (Path(args.out).resolve() / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    met = "met" if page["load_s"] < TARGET_LOAD_S else "MISSED"
    print(f"report of {args.trials + 1} trials: built in {first:.1f} s, rebuilt after one more trial in {again:.1f} s\n"
          f"front page in Chromium: loaded in {page['load_s']:.2f} s (target < {TARGET_LOAD_S:g} s: {met}), "
          f"{page['images']} images ({page['lazy']} lazy), {page['decoded']} decoded at load\n"
          f"size: index.html {size['index_kb']:.0f} KB, {size['thumbs']} thumbnails {size['thumbs_kb']:.0f} KB, "
          f"whole report {size['all_mb']:.1f} MB\njson: {Path(args.out).resolve() / 'report.json'}")
    return result
