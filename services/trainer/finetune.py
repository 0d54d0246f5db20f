"""The fine-tuning loop: AdamW, linear warmup and decay, accumulation, early stopping, AMP.

Batches are formed from texts of similar token length (shuffled chunks sorted by length), so a
CPU epoch spends its time on tokens rather than padding; the order is still random across epochs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from services.trainer.modeling import SentenceClassifier

log = logging.getLogger(__name__)

Device = Literal["auto", "cuda", "mps", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
Metric = Literal["accuracy", "macro_f1"]


class TrainConfig(BaseModel):
    """One training recipe. Defaults are the recipe measured on movie reviews (docs/training.md)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(1e-4, gt=0, description="peak AdamW learning rate of the encoder")
    head_learning_rate: float = Field(1e-3, gt=0, description="learning rate of the new head")
    epochs: int = Field(4, ge=1, le=100, description="maximum epochs")
    batch_size: int = Field(32, ge=1, le=4096, description="examples per optimizer step")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="micro-batches per step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of steps spent warming up")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the head")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    max_length: int = Field(64, ge=8, le=8192, description="tokens per text, longer are truncated")
    seed: int = Field(42, description="seed for data order, initialisation and dropout")
    patience: int = Field(2, ge=1, description="epochs without improvement before stopping")
    metric: Metric = Field("accuracy", description="validation metric for early stopping")
    evals_per_epoch: int = Field(2, ge=1, le=20, description="validation passes per epoch")
    device: Device = Field("auto", description="cuda -> mps -> cpu when auto")
    precision: Precision = Field("auto", description="bf16/fp16 autocast where supported")
    eval_batch_size: int = Field(128, ge=1, description="examples per inference batch")


@dataclass
class Encoded:
    """Token ids of a list of texts, unpadded, plus how many were truncated."""

    ids: list[list[int]]
    truncated: int = 0

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]


@dataclass
class EpochRecord:
    """One validation pass during training."""

    epoch: float
    step: int
    train_loss: float
    metrics: dict[str, float]
    examples_per_second: float


@dataclass
class TrainResult:
    """What training produced: the best model (loaded) and the history."""

    best_metric: float
    best_epoch: float
    history: list[EpochRecord] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    seconds: float = 0.0
    stopped_early: bool = False  # by patience or by the search's pruner
    pruned: bool = False  # by the search's pruner


def seed_everything(seed: int) -> None:
    """Same seed, same run: Python, NumPy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(preference: Device = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit choice that is unavailable is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if preference != "auto":
        if not available[preference]:
            raise ValueError(f"device '{preference}' is not available on this machine")
        return torch.device(preference)
    for name in ("cuda", "mps", "cpu"):
        if available[name]:
            return torch.device(name)
    return torch.device("cpu")


def select_precision(device: torch.device, preference: Precision = "auto") -> Precision:
    """bf16 where the GPU supports it, else fp16 on CUDA; CPU and MPS train in fp32 by default."""
    if preference != "auto":
        if preference == "fp16" and device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a CUDA device")
        return preference
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> Encoded:
    """Tokenize in one batched call of the Rust tokenizer; keep ids unpadded."""
    full = tokenizer(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    limited = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    truncated = sum(len(a) > len(b) for a, b in zip(full, limited, strict=True))
    return Encoded(ids=[list(x) for x in limited], truncated=truncated)


def length_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random | None, chunk: int = 50
) -> list[list[int]]:
    """Batches of similar length. With rng: shuffled chunks, batches in random order."""
    order = list(range(len(lengths)))
    if rng is None:
        order.sort(key=lambda i: lengths[i])
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(order)
    span = batch_size * chunk
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def collate(
    ids: Sequence[Sequence[int]], pad_id: int, multiple: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest text, rounded up to a multiple of 8 (tensor-core and SIMD friendly)."""
    longest = max(len(x) for x in ids)
    width = int(math.ceil(longest / multiple) * multiple)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


@torch.no_grad()
def predict(
    model: SentenceClassifier,
    encoded: Encoded,
    pad_id: int,
    device: torch.device,
    batch_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and pooled embeddings for every text, in input order."""
    model.eval()
    hidden = int(model.config.hidden_size)
    logits = np.zeros((len(encoded.ids), model.head.out_features), dtype=np.float32)
    embeddings = np.zeros((len(encoded.ids), hidden), dtype=np.float32)
    for batch in length_batches(encoded.lengths(), batch_size, rng=None):
        input_ids, mask = collate([encoded.ids[i] for i in batch], pad_id)
        out, emb = model(input_ids.to(device), mask.to(device))
        logits[batch] = out.float().cpu().numpy()
        embeddings[batch] = emb.float().cpu().numpy()
    return logits, embeddings


def _param_groups(model: SentenceClassifier, config: TrainConfig) -> list[dict[str, Any]]:
    """Decay on weights only; the new head learns faster than the pretrained encoder."""
    groups: list[dict[str, Any]] = []
    for module, lr in (
        (model.encoder, config.learning_rate),
        (model.head, config.head_learning_rate),
    ):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """The fused AdamW kernel where the device has one (CPU and CUDA); the per-tensor loop
    otherwise. On a 2-core CPU the fused step is several times faster than the default."""
    if device.type in ("cpu", "cuda"):
        return torch.optim.AdamW(groups, fused=True)
    return torch.optim.AdamW(groups, foreach=True)


EvalFn = Callable[[SentenceClassifier], dict[str, float]]
EpochCallback = Callable[[EpochRecord], None]


class Trainer:
    """Runs one training recipe on encoded data and keeps the best weights."""

    def __init__(
        self,
        model: SentenceClassifier,
        config: TrainConfig,
        pad_id: int,
        evaluate: EvalFn,
        on_eval: EpochCallback | None = None,
        show_progress: bool = False,
        should_stop: Callable[[EpochRecord], bool] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.pad_id = pad_id
        self.evaluate = evaluate
        self.on_eval = on_eval
        self.should_stop = should_stop
        self.show_progress = show_progress
        self.device = select_device(config.device)
        self.precision = select_precision(self.device, config.precision)

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def fit(self, train: Encoded, labels: Sequence[int]) -> TrainResult:
        """Train, validating `evals_per_epoch` times an epoch; restore the best weights."""
        cfg = self.config
        seed_everything(cfg.seed)
        self.model.to(self.device)
        rng = random.Random(cfg.seed)
        micro = max(1, cfg.batch_size // cfg.gradient_accumulation)
        state = _RunState.create(self, math.ceil(len(train.ids) / micro))
        target = torch.tensor(list(labels), dtype=torch.long)
        eval_points = {
            round(state.batches_per_epoch * k / cfg.evals_per_epoch)
            for k in range(1, cfg.evals_per_epoch + 1)
        }
        with _Progress(self.show_progress, cfg.epochs * state.batches_per_epoch) as progress:
            for epoch in range(cfg.epochs):
                self.model.train()
                running, seen, window_start = 0.0, 0, time.perf_counter()
                batches = length_batches(train.lengths(), micro, rng)
                for index, batch in enumerate(batches, start=1):
                    last = index % cfg.gradient_accumulation == 0 or index == len(batches)
                    loss = self._step(state, [train.ids[i] for i in batch], target[batch], last)
                    running, seen = running + loss * len(batch), seen + len(batch)
                    rate = seen / max(time.perf_counter() - window_start, 1e-9)
                    progress.advance(epoch, running / seen, rate)
                    if index in eval_points:
                        point = round(epoch + index / state.batches_per_epoch, 3)
                        if self._validate(state, point, running / seen, rate):
                            break
                if state.result.stopped_early:
                    break
        return self._finish(state)

    def _step(
        self, state: _RunState, ids: list[list[int]], target: torch.Tensor, apply: bool
    ) -> float:
        """Forward and backward one micro-batch; step the optimizer when `apply`."""
        input_ids, mask = collate(ids, self.pad_id)
        with self._autocast():
            logits, _ = self.model(input_ids.to(self.device), mask.to(self.device))
            loss = state.loss_fn(logits.float(), target.to(self.device))
        state.scaler.scale(loss / self.config.gradient_accumulation).backward()
        if apply:
            state.scaler.unscale_(state.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.optimizer.zero_grad(set_to_none=True)
            state.scheduler.step()
            state.step += 1
        return float(loss.detach())

    def _validate(self, state: _RunState, epoch: float, train_loss: float, rate: float) -> bool:
        """Score, keep the best weights, and say whether to stop."""
        record = EpochRecord(
            epoch=epoch,
            step=state.step,
            train_loss=train_loss,
            metrics=self.evaluate(self.model),
            examples_per_second=rate,
        )
        self.model.train()
        result = state.result
        result.history.append(record)
        if self.on_eval:
            self.on_eval(record)
        value = record.metrics[self.config.metric]
        if value > result.best_metric:
            result.best_metric, result.best_epoch = value, record.epoch
            state.best_state = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
            state.evals_without_gain = 0
        else:
            state.evals_without_gain += 1
        patience = self.config.patience * self.config.evals_per_epoch
        pruned = self.should_stop is not None and self.should_stop(record)
        result.pruned = pruned
        result.stopped_early = pruned or state.evals_without_gain >= patience
        return result.stopped_early

    def _finish(self, state: _RunState) -> TrainResult:
        if state.best_state is not None:
            self.model.load_state_dict(state.best_state)
        self.model.eval()
        result = state.result
        result.seconds = time.perf_counter() - state.started
        log.info(
            "training finished",
            extra={
                "best_metric": result.best_metric,
                "best_epoch": result.best_epoch,
                "seconds": round(result.seconds, 1),
            },
        )
        return result


@dataclass
class _RunState:
    """Everything that changes while one recipe trains."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    result: TrainResult
    batches_per_epoch: int
    best_state: dict[str, torch.Tensor] | None = None
    evals_without_gain: int = 0
    step: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, trainer: Trainer, batches_per_epoch: int) -> _RunState:
        from transformers import get_linear_schedule_with_warmup

        cfg = trainer.config
        total = math.ceil(batches_per_epoch / cfg.gradient_accumulation) * cfg.epochs
        optimizer = _adamw(_param_groups(trainer.model, cfg), trainer.device)
        return cls(
            optimizer=optimizer,
            scheduler=get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
                optimizer, int(cfg.warmup_ratio * total), total
            ),
            scaler=torch.amp.GradScaler(enabled=trainer.precision == "fp16"),
            loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
            result=TrainResult(
                best_metric=-math.inf,
                best_epoch=0.0,
                device=str(trainer.device),
                precision=trainer.precision,
            ),
            batches_per_epoch=batches_per_epoch,
        )


class _Progress:
    """A rich progress bar with loss and examples/s, or nothing when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[rate]:.0f} ex/s"),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, epoch=1, loss=0.0, rate=0.0)
        return self

    def advance(self, epoch: int, loss: float, rate: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, epoch=epoch + 1, loss=loss, rate=rate)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
