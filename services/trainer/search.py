"""Hyperparameter search with Optuna: TPE sampling, median pruning, one MLflow child run a trial.

Each trial trains a full model; the best trial's weights are kept rather than retrained, so the
exported model is exactly the one whose validation score won the search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.trainer.finetune import EpochRecord, TrainConfig, TrainResult
from services.trainer.modeling import SentenceClassifier

log = logging.getLogger(__name__)

BATCH_SIZES = (16, 32, 64)


@dataclass
class SearchSpace:
    """Ranges the sampler draws from (log scale for rates)."""

    learning_rate: tuple[float, float] = (3e-5, 2e-4)
    epochs: tuple[int, int] = (2, 4)
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    warmup_ratio: tuple[float, float] = (0.0, 0.2)
    weight_decay: tuple[float, float] = (0.0, 0.1)


@dataclass
class TrialOutcome:
    """A finished trial: its recipe, score, and (for the best so far) its trained model."""

    number: int
    config: TrainConfig
    score: float
    result: TrainResult | None = None


@dataclass
class SearchResult:
    """The winning trial and every trial's score."""

    best: TrialOutcome
    best_model: SentenceClassifier
    trials: list[TrialOutcome] = field(default_factory=list)


def sample_config(trial: Any, base: TrainConfig, space: SearchSpace) -> TrainConfig:
    """A recipe for one trial: the base recipe with the searched fields replaced."""
    return base.model_copy(
        update={
            "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
            "epochs": trial.suggest_int("epochs", *space.epochs),
            "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
            "warmup_ratio": trial.suggest_float("warmup_ratio", *space.warmup_ratio),
            "weight_decay": trial.suggest_float("weight_decay", *space.weight_decay),
        }
    )


# (config, trial number, should_stop callback) -> (trained model, result)
TrainFn = Callable[
    [TrainConfig, int, Callable[[EpochRecord], bool]], tuple[SentenceClassifier, TrainResult]
]


def run_search(
    train: TrainFn, base: TrainConfig, trials: int, space: SearchSpace | None = None
) -> SearchResult:
    """Run `trials` trials; prune a trial whose intermediate score falls below the median."""
    import optuna

    space = space or SearchSpace()
    sampler = optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=min(3, trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    outcomes: list[TrialOutcome] = []
    best: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        config = sample_config(trial, base, space)
        reports = 0

        def should_stop(record: EpochRecord) -> bool:
            nonlocal reports
            trial.report(record.metrics[config.metric], reports)
            reports += 1
            return trial.should_prune()

        model, result = train(config, trial.number, should_stop)
        outcome = TrialOutcome(trial.number, config, result.best_metric, result)
        outcomes.append(outcome)
        if not best or outcome.score > best["outcome"].score:
            best.update(outcome=outcome, model=model)
        if result.pruned:
            raise optuna.TrialPruned()
        return result.best_metric

    # Trial 0 is the recipe as given (the documented defaults unless overridden), so a search
    # can only improve on it; TPE explores around it from there.
    study.enqueue_trial(
        {
            "learning_rate": base.learning_rate,
            "epochs": base.epochs,
            "batch_size": base.batch_size,
            "warmup_ratio": base.warmup_ratio,
            "weight_decay": base.weight_decay,
        },
        skip_if_exists=True,
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials, catch=())
    return SearchResult(best=best["outcome"], best_model=best["model"], trials=outcomes)
