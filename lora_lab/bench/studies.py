"""The benchmark studies behind ``bench truth``, ``bench calibrate`` and ``bench network``: one
``python -m lora_lab.sweep`` study per subject, run as the user would run it, several at once.

On a CPU, two studies side by side with one thread each get through more than one study at a
time with two threads: this small model does not use two threads well (nine truth studies in
3330 s against about 4220 s one at a time on 2 cores, README "Truth"). Each study always runs
on the same number of threads whatever runs beside it, so its results do not depend on the
schedule.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from lora_lab.toyworld import subjects


def default_jobs() -> int:
    """Two studies at once where there are at least two cores, else one."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def subject_sources(given: List[str]) -> Dict[str, str]:
    """Subject label (its file's stem) -> what ``data.subject`` gets: a shipped subject's name,
    or a subject file's absolute path (``--heldout my_subject.yaml``), each checked here."""
    out: Dict[str, str] = {}
    for item in given:
        path = Path(item)
        source = str(path.resolve()) if path.suffix in (".yaml", ".yml") else item
        label = subjects.load(source).name  # a wrong name or a bad file stops here, before any training
        if label in out:
            raise SystemExit(f"error: two subjects are named {label!r} ({out[label]}, {source}); rename one file")
        out[label] = source
    return out


def run_studies(args, sources: Dict[str, str], sweep: str = "truth",
                on_idle: Optional[Callable[[List[str], int], bool]] = None) -> float:
    """One ``+sweep=<sweep>`` study per subject, ``<sweep>_<subject>`` (resumed if it exists),
    ``args.jobs`` at a time (each with the cores / jobs threads; with more than one job each
    study's output goes to ``<root>/<sweep>_<subject>.log``); returns the seconds spent.

    ``on_idle(finished, threads)``: work that can start before every study is done, called
    while the last studies run and a job's cores would otherwise wait (``finished``: the
    subjects done so far, in order; ``threads``: the cores free for it). It does one piece
    and says whether more is left; it is asked again when another study finishes."""
    jobs = max(1, min(int(getattr(args, "jobs", 1) or 1), len(sources)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    pending = list(sources.items())
    running: Dict[str, tuple] = {}
    finished: List[str] = []
    more = on_idle is not None
    try:
        while pending or running:
            if more and not pending and running and len(running) < jobs:
                more = on_idle(list(finished), (jobs - len(running)) * threads)
            while pending and len(running) < jobs:
                name, source = pending.pop(0)
                cmd = [sys.executable, "-m", "lora_lab.sweep", f"+sweep={sweep}", "model=toyworld", "data=toyworld",
                       f"data.subject={source}", f"sweep.name={sweep}_{name}", f"sweep.root={args.root}",
                       f"sweep.reports={args.root / 'reports'}", f"cache_dir={args.cache_dir}", *args.overrides]
                if jobs == 1:
                    print(f"subject {name}: " + " ".join(cmd[2:]), flush=True)
                    running[name] = (subprocess.Popen(cmd, env=env), None, time.perf_counter())
                else:
                    log = Path(args.root) / f"{sweep}_{name}.log"
                    print(f"subject {name}: " + " ".join(cmd[2:]) + f" (output: {log})", flush=True)
                    handle = open(log, "w", encoding="utf-8")
                    running[name] = (subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT),
                                     handle, time.perf_counter())
            time.sleep(0.2)
            for name, (proc, handle, t0) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[name]
                if handle is not None:
                    handle.close()
                if rc != 0:
                    tail = ""
                    if handle is not None:
                        lines = Path(handle.name).read_text(encoding="utf-8", errors="replace").splitlines()
                        tail = "\n".join(lines[-25:]) + "\n"
                    raise SystemExit(f"{tail}error: the {sweep} sweep of subject {name} stopped (exit {rc}); "
                                     f"its reason is above" + (f" (whole output: {handle.name})" if handle else ""))
                finished.append(name)
                more = on_idle is not None
                print(f"subject {name}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        for proc, handle, _ in running.values():  # a failure or Ctrl-C: stop the others too
            proc.terminate()
            proc.wait()
            if handle is not None:
                handle.close()
    return time.perf_counter() - started
