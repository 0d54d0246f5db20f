"""Offline training smoke test and throughput check for a GPU machine.

Trains a randomly initialised classifier of all-MiniLM-L6-v2's shape (BERT, 6 x 384, mean pooling,
2-class linear head) on synthetic token batches whose label is learnable (does token TRIGGER
appear?), in each precision the machine offers: CPU fp32, CUDA fp32, CUDA fp16 autocast with a
GradScaler, CUDA bf16 autocast. Reports examples/s after warm-up and whether the loss fell.

Needs only torch and transformers; downloads nothing, installs nothing, carries no weights.
Exit status: 0 when no mode failed (a machine without CUDA runs the CPU row and exits 0),
1 when a mode raised or its loss did not fall.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import BertConfig, BertModel

VOCAB = 30522
TRIGGER = (
    999  # a token id below the range random tokens are drawn from, so it only appears on purpose
)
RANDOM_LOW = 1000
TRIGGER_COPIES = 8
POOL = 4  # distinct batches cycled during training: cheap to make, enough to learn the rule


@dataclass(frozen=True)
class Mode:
    """One row of the report: where and in which precision to train."""

    name: str
    device: str
    autocast: torch.dtype | None = None
    scaled: bool = False


@dataclass
class Result:
    """What one mode measured; `status` is PASS, FAIL or SHORT (too few steps to judge)."""

    mode: str
    device: str
    batch: int
    steps: int = 0
    timed_steps: int = 0
    examples_per_s: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    seconds: float = 0.0
    status: str = "FAIL"
    error: str | None = None
    losses: list[float] = field(default_factory=list)


class MiniLMClassifier(nn.Module):
    """BERT encoder of all-MiniLM-L6-v2's shape, mean pooling over the mask, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            max_position_embeddings=512,
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Class logits of shape [batch, 2]."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits: torch.Tensor = self.head(pooled)
        return logits


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

MODES: dict[str, Mode] = {
    "cpu-fp32": Mode("cpu-fp32", "cpu"),
    "cuda-fp32": Mode("cuda-fp32", "cuda"),
    "cuda-fp16-amp": Mode("cuda-fp16-amp", "cuda", torch.float16, scaled=True),
    "cuda-bf16-amp": Mode("cuda-bf16-amp", "cuda", torch.bfloat16),
}


def make_batch(size: int, seq_len: int, generator: torch.Generator) -> Batch:
    """Random tokens; odd rows carry TRIGGER at random places and are labelled 1."""
    ids = torch.randint(RANDOM_LOW, VOCAB, (size, seq_len), generator=generator)
    labels = torch.arange(size) % 2
    for row in range(1, size, 2):
        places = torch.randperm(seq_len - 1, generator=generator)[:TRIGGER_COPIES] + 1
        ids[row, places] = TRIGGER
    return ids, torch.ones_like(ids), labels


def make_pool(size: int, seq_len: int, device: str, seed: int) -> list[Batch]:
    """A few fixed batches already on `device`, so the timed loop measures training only."""
    generator = torch.Generator().manual_seed(seed)
    batches = [make_batch(size, seq_len, generator) for _ in range(POOL)]
    return [tuple(t.to(device) for t in batch) for batch in batches]  # type: ignore[misc]


def make_optimizer(model: MiniLMClassifier, lr: float) -> torch.optim.Optimizer:
    """AdamW; the fresh head learns 100x faster than the encoder, as in fine-tuning recipes."""
    groups = [
        {"params": model.encoder.parameters(), "lr": lr},
        {"params": model.head.parameters(), "lr": lr * 100},
    ]
    return torch.optim.AdamW(groups, weight_decay=0.01)


def autocast_for(mode: Mode) -> Callable[[], contextlib.AbstractContextManager[object]]:
    """A factory of the mode's autocast context (a no-op for fp32)."""
    if mode.autocast is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=mode.device, dtype=mode.autocast)


def sync(device: str) -> None:
    """Wait for queued kernels so that wall-clock time measures work done."""
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Trainer:
    """One mode's model, optimizer and step function."""

    mode: Mode
    model: MiniLMClassifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def step(self, batch: Batch) -> torch.Tensor:
        """One optimisation step; returns the detached loss without forcing a sync."""
        ids, mask, labels = batch
        with autocast_for(self.mode)():
            loss = nn.functional.cross_entropy(self.model(ids, mask), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def make_trainer(mode: Mode, seed: int, lr: float) -> Trainer:
    """The same initial weights for every mode, so their loss curves compare."""
    torch.manual_seed(seed)
    model = MiniLMClassifier().to(mode.device).train()
    scaler = torch.amp.GradScaler(mode.device, enabled=mode.scaled)
    return Trainer(mode, model, make_optimizer(model, lr), scaler)


def train(trainer: Trainer, pool: list[Batch], steps: int, deadline: float) -> list[torch.Tensor]:
    """Up to `steps` steps, stopping early at `deadline` (time.monotonic())."""
    losses = []
    for index in range(steps):
        losses.append(trainer.step(pool[index % len(pool)]))
        if time.monotonic() > deadline:
            break
    sync(trainer.mode.device)
    return losses


def judge(result: Result) -> None:
    """PASS when the mean of the last third of losses is below the first third's."""
    losses = result.losses
    if losses:
        result.first_loss, result.last_loss = losses[0], losses[-1]
    if len(losses) < 4:
        result.status = "SHORT"
        return
    third = max(1, len(losses) // 3)
    head, tail = sum(losses[:third]) / third, sum(losses[-third:]) / third
    finite = all(math.isfinite(x) for x in losses)
    result.status = "PASS" if finite and tail < head else "FAIL"
    if result.status == "FAIL":
        result.error = f"loss did not fall: first-third mean {head:.4f}, last-third {tail:.4f}"


def measure(mode: Mode, args: argparse.Namespace, result: Result) -> None:
    """Warm up, then time the rest; fills `result` in place."""
    cpu = mode.device == "cpu"
    steps, warmup = (args.cpu_steps, args.cpu_warmup) if cpu else (args.steps, args.warmup)
    trainer = make_trainer(mode, args.seed, args.lr)
    pool = make_pool(result.batch, args.seq_len, mode.device, args.seed)
    start = time.monotonic()
    deadline = start + args.max_seconds
    losses = train(trainer, pool, warmup, deadline)
    timed_start = time.monotonic()
    timed = train(trainer, pool, steps, deadline) if timed_start < deadline else []
    elapsed = time.monotonic() - timed_start
    result.losses = [float(x) for x in torch.stack(losses + timed).float().cpu()]
    result.steps, result.timed_steps = len(result.losses), len(timed)
    result.seconds = round(time.monotonic() - start, 2)
    if timed:
        result.examples_per_s = round(len(timed) * result.batch / elapsed, 1)


def run_mode(mode: Mode, args: argparse.Namespace) -> Result:
    """Measure and judge one mode; an exception becomes a FAIL row, not a crash."""
    batch = args.cpu_batch if mode.device == "cpu" else args.batch
    result = Result(mode=mode.name, device=mode.device, batch=batch)
    try:
        measure(mode, args, result)
        judge(result)
    except Exception as error:  # report and go on to the next mode
        result.status, result.error = "FAIL", f"{type(error).__name__}: {error}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def plan(cuda: bool) -> list[Mode]:
    """The modes this machine can run."""
    names = ["cpu-fp32"]
    if cuda:
        names += ["cuda-fp32", "cuda-fp16-amp"]
        if torch.cuda.is_bf16_supported():
            names.append("cuda-bf16-amp")
    return [MODES[name] for name in names]


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if torch.cuda.is_available():
        info |= {
            "gpu": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        }
    return info


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or a dash when it was not measured."""
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> Iterator[str]:
    """The report's rows as fixed-width text."""
    yield f"{'mode':<15}{'batch':>6}{'steps':>7}{'examples/s':>12}{'first':>9}{'last':>9}  status"
    for r in results:
        yield (
            f"{r.mode:<15}{r.batch:>6}{r.steps:>7}{fmt(r.examples_per_s, '.1f'):>12}"
            f"{fmt(r.first_loss, '.4f'):>9}{fmt(r.last_loss, '.4f'):>9}  {r.status}"
        )


def report(info: dict[str, object], results: list[Result], out: Path) -> None:
    """Print the header, the table and any FAIL lines; write the JSON next to them."""
    for key, value in info.items():
        print(f"{key:>25}: {value}")
    if not info["cuda_available"]:
        print("NO GPU DETECTED: torch.cuda.is_available() is False; ran the CPU row only.")
    print()
    print("\n".join(table(results)))
    for r in results:
        if r.status != "PASS":
            print(f"{r.status} {r.mode}: {r.error or 'too few steps within the time box to judge'}")
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "results": [asdict(r) for r in results]}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {out / 'gpu_check.json'}")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; the defaults fit every mode in about 30 s."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    p.add_argument("--batch", type=int, default=32, help="GPU batch size")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="timed GPU steps per mode")
    p.add_argument("--warmup", type=int, default=10, help="untimed GPU steps per mode")
    p.add_argument("--cpu-batch", type=int, default=8, help="CPU batch size (CPU is slow)")
    p.add_argument("--cpu-steps", type=int, default=7, help="timed CPU steps")
    p.add_argument("--cpu-warmup", type=int, default=1, help="untimed CPU steps")
    p.add_argument("--max-seconds", type=float, default=30.0, help="time box per mode")
    p.add_argument("--lr", type=float, default=3e-5, help="encoder learning rate")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every mode this machine supports; 1 if any failed."""
    args = parse(argv)
    info = machine()
    if not info["cuda_available"]:
        print("no GPU detected (torch.cuda.is_available() is False): running the CPU row only")
    results = []
    for mode in plan(bool(info["cuda_available"])):
        print(f"running {mode.name} ...", flush=True)
        results.append(run_mode(mode, args))
    report(info, results, args.out)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
