"""Sweeps: ``python -m lora_lab.sweep +sweep=scheduler`` runs one training run + evaluation
per Optuna trial, resumable, pruned on per-epoch scores, with a leaderboard at the end.

Optuna's own objects are made in :mod:`lora_lab.sweep.study`. A study lives in ``<sweep.root>/<sweep.name>/``: the
storage (a journal file, or a database URL for several machines), ``study.json``, one
``trial_<n>/`` folder per trial and the leaderboard. Running the same command again resumes:
finished trials are kept, a trial whose worker died is retried, every grid point runs once.
"""

from __future__ import annotations

import difflib
import errno
import json
import logging
import os
import shutil
import socket
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional, Tuple

from omegaconf import OmegaConf

from lora_lab.config import Config, ConfigError, as_dict, to_config, to_yaml
from lora_lab.errors import LoraLabError
from lora_lab.files import atomic_write_text
from lora_lab.report import leaderboard
from lora_lab.sweep.study import counts, heartbeat, is_duplicate, open_study, suggest
from lora_lab.sweep.trial import (COMPLETE, FAILED, PRUNED, RUNNING, Worker, command_line_notes, trial_config,
                                   write_trial)
from lora_lab.versions import versions

log = logging.getLogger("lora_lab.sweep")


class SweepFailed(LoraLabError):
    """Every trial of the study failed: there is nothing to pick from."""


def _flat_keys(node, prefix: str = "") -> list:
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict) and key not in ("optimizer_args",):
            out += _flat_keys(value, path + ".")
    return out


def check_keys(config: Config) -> None:
    """Every grid, space, variant and fixed key must be a path in the config.

    Raises:
        ConfigError: naming the key and the closest real paths.
    """
    sweep = config.sweep
    known = _flat_keys(as_dict(replace(config, sweep=None)))
    keys = [("sweep.grid", k) for k in sweep.grid] + [("sweep.space", k) for k in sweep.space] + \
        [("sweep.fixed", k) for k in sweep.fixed] + \
        [(f"sweep.variants.{name}", k) for name, v in sweep.variants.items() for k in v]
    for where, key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: {key!r} is not a config path (like train.lr_scheduler){hint}")


def _reclaim_dead_local_trials(study, study_dir: Path) -> None:
    """A journal-file study has no heartbeat: a RUNNING trial whose worker process on this
    machine is gone was killed. Mark it failed and queue its parameters again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(t.user_attrs.get("pid")):
            continue
        _requeue(study, t.number, t.params, study_dir,
                 "the worker running this trial died; its parameters were queued again")
        study.tell(t.number, state=TrialState.FAIL)
        log.info(f"trial {t.number}: its worker (pid {t.user_attrs.get('pid')}) died; queued again")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def work(config: Config, study_dir: Path) -> float:
    """One worker: ask for trials until the study has none left. Returns the seconds spent
    loading the model, data and scorers (0 when there was nothing left to do)."""
    from optuna.trial import TrialState

    sweep = config.sweep
    import optuna

    study = open_study(sweep, study_dir, on_stale=lambda study, trial: _requeue(
        study, trial.number, trial.params, study_dir,
        "the worker running this trial stopped sending heartbeats; its parameters were queued again"))
    _reclaim_dead_local_trials(study, study_dir)
    worker: Optional[Worker] = None
    while True:
        if sweep.storage:
            optuna.storages.fail_stale_trials(study)
        remaining, taken = counts(study, sweep)
        if remaining <= 0:
            break
        if worker is None:
            worker = Worker(config, study_dir)
            worker.after_check = lambda: live_report(study_dir, Path(sweep.reports))
        trial = study.ask()
        params = suggest(trial, sweep)
        key = json.dumps(params, sort_keys=True, default=str)
        if is_duplicate(study, trial.number, key):
            trial.set_user_attr("role", "duplicate")
            study.tell(trial, state=TrialState.FAIL)
            continue
        for k, v in (("host", socket.gethostname()), ("pid", os.getpid())):
            trial.set_user_attr(k, v)
        tdir = study_dir / f"trial_{trial.number}"
        tdir.mkdir(parents=True, exist_ok=True)
        started = time.time()
        write_trial(tdir, number=trial.number, state=RUNNING, params=params, host=socket.gethostname(),
                     pid=os.getpid(), started=started, versions=versions())
        log.info(f"trial {trial.number} start: " + ", ".join(f"{k}={v}" for k, v in params.items()))
        try:
            with heartbeat(study, trial):
                state, value, fields = worker.run(trial, params)
        except OSError as exc:
            if exc.errno not in _DISK_ERRORS:
                state, value, fields = _failed(tdir, exc)
            else:  # the disk, not the trial: stop the sweep, keep the point for the resume
                _requeue(study, trial.number, params, study_dir,
                         f"stopped: {exc.strerror} while writing; parameters queued again")
                study.tell(trial, state=TrialState.FAIL)
                raise LoraLabError(
                    f"output folder {tdir}: {exc.strerror or exc}. Free some space (or fix the folder's "
                    "permissions) and run the same command again: the sweep resumes where it stopped") from None
        except Exception as exc:  # one trial's failure never stops the study
            state, value, fields = _failed(tdir, exc)
        duration = round(time.time() - started, 1)
        fields["rss_mb"] = round(_rss_mb(), 1)  # resident memory after the trial: leaks show here
        write_trial(tdir, state=state, objective=value, duration_s=duration, **fields)
        if state == COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState.PRUNED if state == PRUNED else TrialState.FAIL)
        score = f"{sweep.objective} {value:.4g}" if value is not None else fields.get("reason", "")
        log.info(f"trial {trial.number} {state} in {duration:.0f}s: {score}")
        live_report(study_dir, Path(sweep.reports), log_progress=True)
    return worker.load_s if worker is not None else 0.0


def live_report(study_dir: Path, reports: Path, log_progress: bool = False) -> Optional[Path]:
    """Rewrite the study's report now (it is swapped in whole, so a reader never sees half of
    one) and, with ``log_progress``, print the progress line it shows. A report that cannot be
    written is said once per call and never stops the study."""
    from lora_lab.report.front import progress, progress_text
    from lora_lab.report.study import build_report

    try:
        index = build_report(study_dir, reports)
    except Exception as exc:  # the study matters more than its report
        log.warning(f"report not updated: {exc.__class__.__name__}: {exc}")
        return None
    if log_progress:
        study = json.loads((study_dir / "study.json").read_text())
        log.info(progress_text(progress(study_dir, leaderboard.build(study_dir), study)))
    return index


_DISK_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT)


def _failed(tdir: Path, exc: BaseException) -> Tuple[str, None, dict]:
    """A trial's own failure (NaN loss, out of memory, an invalid combination, a scorer error)."""
    notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", []))
    reason = str(exc) if isinstance(exc, LoraLabError) else f"{exc.__class__.__name__}{notes}: {exc}"
    detail = "" if isinstance(exc, LoraLabError) else "\n\n" + traceback.format_exc()
    atomic_write_text(tdir / "error.txt", reason + detail + "\n")
    return FAILED, None, {"reason": reason}


def _requeue(study, number: int, params: dict, study_dir: Path, why: str) -> None:
    """Queue a trial's parameters again and mark the attempt as retried (left out of the leaderboard)."""
    study.enqueue_trial(params, user_attrs={"retry_of": number}, skip_if_exists=False)
    tdir = study_dir / f"trial_{number}"
    try:
        tdir.mkdir(parents=True, exist_ok=True)
        for stale in tdir.rglob(".*.tmp"):  # temp files of writes the worker never finished
            stale.unlink()
        (tdir / "error.txt").write_text(why + "\n", encoding="utf-8")
        write_trial(tdir, number=number, state="retried", params=params, reason=why)
    except OSError:
        pass  # a full disk may refuse even this; the storage already knows


def _check_inputs(config: Config):
    """Everything that can be checked without loading a model: data, prompt suite, model path,
    the sweep's fixed settings on this machine, and each variant's settings."""
    from lora_lab.data.dataset import load_dataset
    from lora_lab.data.suites import load_suite
    from lora_lab.device import pick_device
    from lora_lab.models.base import resolve_source
    from lora_lab.train.optimizers import check_environment

    dataset = load_dataset(config.data, Path(config.cache_dir), config.explicit)
    load_suite(config.eval.suite, dataset.token or "", dataset.suite)
    if config.model.pretrained:
        resolve_source(config.model, Path(config.cache_dir))
    device = pick_device(config.device)
    base = trial_config(config, {}, Path(config.sweep.root) / config.sweep.name / "check")
    check_environment(base.train, device)
    return dataset


def cpu_threads(workers: int) -> int:
    """Each CPU worker's share of the cores torch would use in one process. Left alone, every
    worker starts as many threads as there are cores: 2 workers on 2 cores trained at 2.2 steps/s
    each, against 9 with one thread each (the bench model at 64 px)."""
    import torch

    return max(1, torch.get_num_threads() // workers)


def _work_in_subprocess(config_yaml: str, explicit: list, study_dir: str, index: int, gpus: int,
                        threads: int = 0) -> None:
    from lora_lab.cli import setup_logging

    if gpus > 1:  # one GPU per worker process; set before torch initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
    if threads:
        import torch

        torch.set_num_threads(threads)
    setup_logging()
    work(to_config(OmegaConf.create(config_yaml), explicit), Path(study_dir))


def run(config: Config) -> "leaderboard.pd.DataFrame":
    """The ``python -m lora_lab.sweep`` job."""
    if config.sweep is None:
        from lora_lab.config import conf_dir

        names = ", ".join(sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml")))
        raise ConfigError(f"sweep: choose a sweep with +sweep=NAME (available: {names})")
    entered = time.time()
    from lora_lab.data import kohya_toml

    config = kohya_toml.apply(config)  # a dataset_config.toml's resolution / batch_size, below the sweep's own
    sweep = config.sweep
    check_keys(config)
    dataset = _check_inputs(config)  # bad input stops here, before any folder or trial exists
    study_dir = Path(sweep.root) / sweep.name
    created = not study_dir.exists()
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: workers on several machines start on one folder at once.
        probe = study_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        if created:
            shutil.rmtree(study_dir, ignore_errors=True)
        raise LoraLabError(f"sweep.root: cannot write to {study_dir} ({exc.strerror or exc}); "
                           "choose a writable folder with sweep.root=...") from None
    definition = {"name": sweep.name, "direction": sweep.direction, "objective": sweep.objective,
                  "sampler": sweep.sampler, "pruner": sweep.pruner, "grid": sweep.grid,
                  "variants": sweep.variants, "space": sweep.space, "fixed": sweep.fixed,
                  "n_trials": sweep.n_trials,
                  "total_trials": sweep.grid_size() if sweep.sampler == "grid" else sweep.n_trials}
    atomic_write_text(study_dir / "study.json", json.dumps(definition, indent=2, default=str) + "\n")
    atomic_write_text(study_dir / "sweep.yaml", to_yaml(config))
    log.info(f"study {sweep.name}: {sweep.grid_size() if sweep.sampler == 'grid' else sweep.n_trials} trials "
             f"({sweep.sampler}), objective {sweep.objective}, folder {study_dir}")
    from lora_lab.train import preflight

    for line in command_line_notes(config):
        log.info(line)
    fixed = trial_config(config, {}, study_dir / "check")  # with sweep.fixed; a trial's own values may differ
    if fixed.data != config.data:  # e.g. data.repeats fixed by the sweep
        from lora_lab.data.dataset import load_dataset

        dataset = load_dataset(fixed.data, Path(fixed.cache_dir), fixed.explicit)
    for line in preflight.describe(fixed, dataset):
        log.info(line)
    preflight.doctor(fixed, dataset, study_dir)
    index = live_report(study_dir, Path(sweep.reports))
    if index is not None:
        log.info(f"report (rewritten after every trial and per-epoch check; reload it): {index}")
    load_s = None
    if sweep.workers > 1:
        import multiprocessing as mp

        import torch

        gpus = torch.cuda.device_count() if config.device in ("auto", "cuda") else 0
        threads = cpu_threads(sweep.workers) if gpus == 0 else 0
        # On the CPU this process is the first worker: its imports and checks are done, and
        # the others start beside it (on a GPU machine each worker picks its GPU before CUDA
        # starts, so all of them are new processes).
        spawned = range(1, sweep.workers) if threads else range(sweep.workers)
        if threads:
            log.info(f"{sweep.workers} workers on the CPU, {threads} thread{'s' if threads > 1 else ''} each")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_work_in_subprocess,
                             args=(to_yaml(config), config.explicit, str(study_dir), i, gpus, threads))
                 for i in spawned]
        for p in procs:
            p.start()
        before = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(threads)
                load_s = work(config, study_dir)
        finally:
            torch.set_num_threads(before)
            for p in procs:
                p.join()
    else:
        load_s = work(config, study_dir)
    reporting = time.time()
    table = leaderboard.build(study_dir)
    leaderboard.save(study_dir, table)
    log.info(leaderboard.render_text(table))
    log.info(leaderboard.verdict_text(study_dir))
    log.info(leaderboard.best_text(table))
    for note in leaderboard.notes(study_dir):
        log.info(f"note: {note}")
    from lora_lab.report.study import build_report

    index = build_report(study_dir, Path(sweep.reports))
    _write_timing(study_dir, entered, load_s, time.time() - reporting)
    log.info(f"leaderboard: {study_dir / 'leaderboard.csv'}")
    log.info(f"report: {index}")
    log.info(f"TensorBoard: tensorboard --logdir {study_dir}")
    log.info(f"disagree with a verdict? label cells in the report (u / g / o), Download labels, then: "
             f"python -m lora_lab.calibrate {study_dir} labels.json")
    _raise_if_all_failed(table)
    return table


def _write_timing(study_dir: Path, entered: float, load_s: Optional[float], report_s: float) -> None:
    """This run's time outside the trials: start-up (interpreter, imports, Hydra), loading (one
    in-process worker), the leaderboard and report; the trials' own stages are in trial.json."""
    import psutil

    now = time.time()
    started = psutil.Process().create_time()
    atomic_write_text(study_dir / "timing.json", json.dumps({
        "startup_s": round(entered - started, 3), "load_s": None if load_s is None else round(load_s, 3),
        "report_s": round(report_s, 3), "process_s": round(now - started, 3)}, indent=2) + "\n")


def _raise_if_all_failed(table) -> None:
    """A study in which no trial finished or was pruned has no result: say so and exit non-zero."""
    if len(table) == 0 or (table.state != FAILED).any():
        return
    reasons = table.reason.dropna().astype(str)
    common = reasons.mode().iloc[0] if len(reasons) else "no reason recorded"
    raise SweepFailed(f"all {len(table)} trials failed: {common}")


def main() -> None:
    from lora_lab.cli import exit_now, hydra_entry

    hydra_entry(run, "lora_lab.sweep")()
    exit_now()


if __name__ == "__main__":
    main()
