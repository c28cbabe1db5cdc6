"""Optuna for a sweep: the study's storage (a journal file, or a database for several
machines), its sampler and pruner, each trial's parameters, heartbeats, and which grid points
are taken. The only place besides the orchestration (:mod:`lora_lab.sweep.run`) that touches
Optuna's objects; nothing outside ``lora_lab/sweep/`` imports optuna.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lora_lab.errors import ConfigError, LoraLabError, first_line

HEARTBEAT_S = 30


def storage_for(sweep, study_dir: Path, on_stale: Optional[Callable[[Any, Any], None]] = None):
    """The study's storage: a journal file in ``study_dir``, or ``sweep.storage``'s database with
    heartbeats, where ``on_stale(study, trial)`` runs for a trial whose worker went silent."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if sweep.storage:
        if not sweep.storage.startswith(("postgresql", "mysql", "sqlite")):
            raise ConfigError(f"sweep.storage: {sweep.storage!r} is not a database URL (postgresql+psycopg://user@host/db)")

        # Heartbeats let any worker reclaim the trial of a worker that died, on any machine.
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(sweep.storage, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=3 * HEARTBEAT_S,
                                                      heartbeat_stale_trial_callback=on_stale)
            except Exception as exc:  # driver missing, server unreachable, bad credentials
                # Workers starting together race to create the tables: the losers try again.
                if attempt == 4 or "duplicate key" not in str(exc) and "already exists" not in str(exc):
                    raise LoraLabError(f"sweep.storage: cannot open {sweep.storage}: {first_line(exc)}") from None
                time.sleep(1 + attempt)
    return JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))


def grid_sampler_class():
    import optuna

    class AskTellGrid(optuna.samplers.GridSampler):
        """GridSampler whose after_trial does not call study.stop(), which only works inside
        study.optimize; our ask/tell loop stops by counting the grid points left."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGrid


def ask_tell_grid(space, seed):
    return grid_sampler_class()(space, seed=seed)


def open_study(sweep, study_dir: Path, on_stale: Optional[Callable[[Any, Any], None]] = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {k: list(v) for k, v in sweep.grid.items()}
    if sweep.variants:
        space["variant"] = list(sweep.variants)
    if sweep.sampler == "grid":
        sampler = ask_tell_grid(space, seed=sweep.seed)
    elif sweep.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sweep.seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.create_study(study_name=sweep.name, storage=storage_for(sweep, study_dir, on_stale), sampler=sampler,
                               pruner=make_pruner(sweep), direction=sweep.direction, load_if_exists=True)


def make_pruner(sweep):
    """Optuna's pruner for ``sweep.pruner`` (steps are epochs), with warm-up and patience."""
    import optuna

    if sweep.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are epochs, counted from 1; Optuna prunes from step == n_warmup_steps on, so W
    # protected epochs means n_warmup_steps = W + 1.
    warmup = sweep.pruner_warmup_epochs + 1
    if sweep.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=sweep.pruner_startup_trials, n_warmup_steps=warmup)
    else:
        pruner = optuna.pruners.PercentilePruner(sweep.pruner_percentile, n_startup_trials=sweep.pruner_startup_trials,
                                                 n_warmup_steps=warmup)
    if sweep.pruner_patience:
        with warnings.catch_warnings():  # PatientPruner is marked experimental (Optuna 2.8+)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            pruner = optuna.pruners.PatientPruner(pruner, patience=sweep.pruner_patience)
    return pruner


def suggest(trial, sweep) -> Dict[str, Any]:
    params: Dict[str, Any] = {}
    for key, values in sweep.grid.items():
        params[key] = trial.suggest_categorical(key, list(values))
    if sweep.variants:
        params["variant"] = trial.suggest_categorical("variant", list(sweep.variants))
    for key, spec in sweep.space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], log=bool(spec.get("log")))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            params[key] = trial.suggest_categorical(key, list(spec["choices"]))
    return params


def counts(study, sweep) -> Tuple[int, set]:
    """(trials still to start, parameter sets already taken) from the storage."""
    from optuna.trial import TrialState

    taken = set()
    waiting = 0
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    for t in trials:
        if t.user_attrs.get("role") == "duplicate" or t.number in again:
            continue
        if t.state == TrialState.WAITING:
            waiting += 1
        taken.add(json.dumps(t.params, sort_keys=True, default=str) if t.params else f"#{t.number}")
    total = sweep.grid_size() if sweep.sampler == "grid" else sweep.n_trials
    if sweep.n_trials and sweep.sampler == "grid":
        total = min(total, sweep.n_trials)
    started = len(taken) - waiting
    return max(0, total - started), taken


@contextmanager
def heartbeat(study, trial):
    """Record heartbeats while a trial runs (database storage only), so a trial whose worker
    died is noticed by the other workers (optuna.storages.fail_stale_trials)."""
    # Optuna keeps heartbeats for its own optimize() loop; an ask-and-tell worker can only reach
    # them through the study's storage, which has no public accessor.
    storage = study._storage
    if not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(trial._trial_id)
            stop.wait(HEARTBEAT_S)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def retried(trials) -> set:
    """Numbers of trials whose parameters were queued again (their worker died)."""
    return {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}


def is_duplicate(study, number: int, key: str) -> bool:
    """Another worker already has this grid point: the lower trial number keeps it."""
    trials = study.get_trials(deepcopy=False)
    again = retried(trials)
    for t in trials:
        if t.number >= number or t.user_attrs.get("role") == "duplicate" or t.number in again:
            continue
        if json.dumps(t.params, sort_keys=True, default=str) == key:
            return True
    return False


def replay_pruning(make: Callable[[], Any], trials: Sequence[Tuple[Dict[int, float], float]]) -> List[Optional[int]]:
    """Feed recorded per-epoch checks to a fresh pruner from ``make``, trials in order, as a
    sweep would have. Each trial is (value at each checked epoch, final objective); returns the
    epoch each trial was pruned at (None: it ran to the end)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=make())
    out: List[Optional[int]] = []
    for per_epoch, final in trials:
        trial = study.ask()
        stopped = None
        for epoch in sorted(per_epoch):
            trial.report(per_epoch[epoch], epoch)
            if trial.should_prune():
                stopped = epoch
                break
        if stopped is None:
            study.tell(trial, final)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        out.append(stopped)
    return out
