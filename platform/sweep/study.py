"""The sweep's Optuna study: RDB storage URLs (`absolute_storage`), opening it with the seeded TPE
sampler (`open_study`), recovering it after the driver died (`recover_study`), the Optuna trial of
a Tune trial (`RecordTrialNumber`, `set_trial_attrs`) and where a sweep's files go (`sweep_dir`).

Only Optuna's public API: the study, and the storage's own methods (`BaseStorage` is Optuna's
documented interface for storages), never a study's or trial's underscore attributes.

The search space is `sweep.space`; the Ray Tune side is `sweep.tune`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advflow.platform.config import ConfigError
from advflow.platform.sweep.space import SweepSpace
from advflow.platform.tracking.secrets import redact_url

_SQLITE = "sqlite:///"


def _sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other URLs and in-memory SQLite)."""
    path = url[len(_SQLITE):] if url.startswith(_SQLITE) else ""
    return Path(path) if path and path != ":memory:" else None


def absolute_storage(url: str) -> str:
    """A relative SQLite URL made absolute against this process's working directory: Tune runs
    trials in their own directories, and they must open the same file as the driver."""
    path = _sqlite_file(url)
    return _SQLITE + str(path.resolve()) if path is not None and not path.is_absolute() else url


def open_study(space: SweepSpace):
    """The RDB-backed study (created or loaded), with the seeded TPE sampler."""
    import optuna

    if (db := _sqlite_file(space.storage)) is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.n_startup_trials)
    storage = optuna.storages.RDBStorage(space.storage)
    direction = "minimize" if space.mode == "min" else "maximize"
    study = optuna.create_study(study_name=space.study_name, storage=storage, sampler=sampler,
                                direction=direction, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {space.study_name!r} in {redact_url(space.storage)} optimises "
                          f"{study.direction.name.lower()}, but the space says mode={space.mode}; "
                          "use another study_name or fix mode")
    return study, storage, sampler


def recover_study(study, storage) -> dict[str, int]:
    """After a driver died: trials left RUNNING by the dead driver are marked FAIL (they will not be
    resumed), finished ones are kept and count toward --trials. Returns the state counts."""
    import optuna

    TS = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(TS.RUNNING, TS.WAITING)):
        trial_id = trial_storage_id(storage, study.study_name, t.number)
        storage.set_trial_user_attr(trial_id, "failed_reason", "sweep driver died; trial abandoned")
        storage.set_trial_state_values(trial_id, state=TS.FAIL)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# The key under which the define-by-run space hands each Tune trial its Optuna trial number: Tune
# trials are matched to Optuna trials by this recorded number, never by equal parameter values (two
# trials may draw the same values, e.g. a categorical-only space or an enqueued baseline).
TRIAL_KEY = "advflow.optuna_trial"


class RecordTrialNumber:
    """OptunaSearch's define-by-run space: the space's draws, plus the Optuna trial's number as a
    constant (OptunaSearch merges a returned dict of constants into the Tune trial's config). A class,
    not a closure, so Tune can pickle the searcher with its experiment state."""

    def __init__(self, space: SweepSpace):
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        self.space.suggest(trial)
        return {TRIAL_KEY: trial.number}


def trial_storage_id(storage, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of `study_name` (the key its public methods take)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def set_trial_attrs(storage_url: str, study_name: str, number: int, attrs: dict[str, Any]) -> None:
    """Record `attrs` as user attributes of the study's trial `number` (from a Tune trial's process)."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    trial_id = trial_storage_id(storage, study_name, number)
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)


def sweep_dir(space: SweepSpace) -> Path:
    """Where a sweep's Tune state and report go: beside a SQLite study, else ./sweeps."""
    db = _sqlite_file(space.storage)
    return db.resolve().parent if db is not None else Path("sweeps").resolve()
