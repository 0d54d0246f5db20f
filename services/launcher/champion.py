"""The first champion: where its training text comes from, and the job that trains it.

Text comes from `../shared/data` (this project's labelled sentences) when present, else from the
public Rotten Tomatoes data set through the `datasets` library for users with a network. With
neither, the error says what to do instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loopline.errors import KIND_BY_STATUS, ErrorKind, FailedPrecondition, LooplineError

__all__ = [
    "TrainingText",
    "admin_metadata",
    "champion_spec",
    "find_data_dir",
    "follow_job",
    "retrain_spec",
    "rpc_failure",
    "submit_and_follow",
    "training_text",
    "write_subset",
]

MOVIES = Path("movie_reviews")
REPOSITORY = Path(__file__).resolve().parents[2]
Metadata = tuple[tuple[str, str], ...]


def find_data_dir(explicit: Path | None) -> Path | None:
    """The configured folder (which must hold movie_reviews/), else ../shared/data beside the
    working directory or the repository, else None."""
    if explicit is not None:
        if not (explicit / MOVIES / "train.jsonl").is_file():
            raise FailedPrecondition(
                f"{explicit} has no {MOVIES / 'train.jsonl'} (LOOPLINE_UP_DATA_DIR)"
            )
        return explicit
    for candidate in (Path.cwd().parent / "shared" / "data", REPOSITORY.parent / "shared" / "data"):
        if (candidate / MOVIES / "train.jsonl").is_file():
            return candidate.resolve()
    return None


def write_subset(source: Path, target: Path, count: int) -> Path:
    """The first `count` rows of a JSON-lines file (the shared files are already shuffled)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with source.open(encoding="utf-8") as reader, target.open("w", encoding="utf-8") as writer:
        for n, line in enumerate(reader):
            if n >= count:
                break
            writer.write(line)
    return target


def _write_rows(rows: Iterable[dict[str, Any]], target: Path, count: int) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w", encoding="utf-8") as writer:
        for n, row in enumerate(rows):
            if n >= count:
                break
            writer.write(json.dumps(row, ensure_ascii=False) + "\n")
    return target


def _from_hub(folder: Path, count: int) -> tuple[Path, Path]:
    """Rotten Tomatoes (the same sentences as movie_reviews/) through `datasets`."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise FailedPrecondition(
            "no training text for the first champion: ../shared/data/movie_reviews is not here "
            "and the `datasets` library is not installed (pip install datasets). Set "
            "LOOPLINE_UP_DATA_DIR to a folder with movie_reviews/train.jsonl and "
            "validation.jsonl, or register a champion first with `loopline train`."
        ) from None
    try:
        corpus = load_dataset("cornell-movie-review-data/rotten_tomatoes")
    except Exception as err:
        raise FailedPrecondition(
            "no training text for the first champion: ../shared/data/movie_reviews is not here "
            f"and Rotten Tomatoes could not be fetched ({type(err).__name__}: {err}). Set "
            "LOOPLINE_UP_DATA_DIR, or register a champion first with `loopline train`."
        ) from None
    names = corpus["train"].features["label"].names

    def rows(split: str) -> Iterable[dict[str, Any]]:
        for item in corpus[split].shuffle(seed=42):
            yield {"text": item["text"], "label": names[item["label"]]}

    return (
        _write_rows(rows("train"), folder / "train.jsonl", count),
        _write_rows(rows("validation"), folder / "validation.jsonl", 1000),
    )


class TrainingText:
    """Train and validation files under the launcher's home, and the data folder they came from."""

    def __init__(self, train: Path, validation: Path, data_dir: Path | None) -> None:
        self.train = train
        self.validation = validation
        self.data_dir = data_dir


def training_text(home: Path, data_dir: Path | None, count: int) -> TrainingText:
    folder = home / "data"
    found = find_data_dir(data_dir)
    if found is None:
        train, validation = _from_hub(folder, count)
        return TrainingText(train, validation, None)
    train = write_subset(found / MOVIES / "train.jsonl", folder / "train.jsonl", count)
    return TrainingText(train, found / MOVIES / "validation.jsonl", found)


def champion_spec(
    name: str, text: TrainingText, epochs: int, max_length: int, base_model: str
) -> dict[str, Any]:
    """A job spec (loopline/jobspec.py) that trains a version and makes it the champion."""
    spec: dict[str, Any] = {
        "name": name,
        "alias": "champion",
        "data": [{"file": {"path": str(text.train.resolve())}}],
        "validation": {"file": {"path": str(text.validation.resolve())}},
        "epochs": epochs,
        "max_length": max_length,
        "promotion": "always",
        "tags": {"loopline.source": "loopline up"},
    }
    if base_model:
        spec["base_model"] = base_model
    return spec


def retrain_spec(
    name: str, text: TrainingText, epochs: int, max_length: int, min_examples: int = 200
) -> dict[str, Any]:
    """What a drift or accuracy alert submits: continue from the champion on labelled production
    traffic (the monitor narrows the window to what arrived since that version was trained), kept
    as challenger only when the gate passes."""
    return {
        "name": name,
        "base_model": f"models:/{name}@champion",
        "data": [{"feedback": {"min_examples": min_examples}}],
        "validation": {"file": {"path": str(text.validation.resolve())}},
        "epochs": epochs,
        "max_length": max_length,
        "promotion": "gate",
        "gate": {"metric": "accuracy", "min_improvement": 0.0},
        "tags": {"loopline.source": "retraining trigger"},
    }


def admin_metadata(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The bearer token the stack's services were started with (`LOOPLINE_ADMIN_TOKEN`)."""
    token = environ.get("LOOPLINE_ADMIN_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def rpc_failure(err: Any, what: str) -> LooplineError:
    """A failed call to one of the stack's services as an error the CLI reports in one line."""
    code = err.code()
    return LooplineError(
        f"{what}: {code.name} {err.details() or ''}".rstrip(),
        kind=KIND_BY_STATUS.get(code, ErrorKind.INTERNAL),
    )


def follow_job(
    stub: Any, job_id: str, on_event: Callable[[Any], None], metadata: Metadata = ()
) -> Any:
    """Stream a job's events to `on_event`; its final state."""
    from loopline.v1 import trainer_pb2 as pb

    job = stub.GetJob(pb.GetJobRequest(id=job_id), metadata=metadata, timeout=30)
    for event in stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=metadata):
        on_event(event)
        if event.WhichOneof("event") == "job":
            job = event.job
    return job


def submit_and_follow(
    trainer: str,
    spec: dict[str, Any],
    key: str,
    on_event: Callable[[Any], None],
    metadata: Metadata = (),
) -> Any:
    """Submit `spec` to the trainer at `trainer` and follow it; the final Job."""
    import grpc

    from loopline.jobspec import parse_spec, spec_pb
    from loopline.v1 import trainer_pb2 as pb
    from loopline.v1 import trainer_pb2_grpc as pb_grpc

    message = spec_pb(parse_spec(spec))
    with grpc.insecure_channel(trainer) as channel:
        stub = pb_grpc.TrainerStub(channel)
        try:
            job = stub.SubmitJob(
                pb.SubmitJobRequest(spec=message, request_id=key), metadata=metadata, timeout=30
            )
            return follow_job(stub, job.id, on_event, metadata)
        except grpc.RpcError as err:
            raise rpc_failure(err, f"training job on {trainer}") from None
