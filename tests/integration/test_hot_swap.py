"""Alias moves under load: the worker follows `champion` forward and back with zero failures.

Real parts: two versions registered in a throwaway MLflow store, a worker in this process on
loopback (its alias watcher polling the store), and client threads sending requests throughout.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from loopline.grpc_server import running
from loopline.oip import grpc_service_pb2 as pb
from loopline.oip import grpc_service_pb2_grpc as pb_grpc
from loopline.registry import Registry
from services.inference.convert import encode_bytes_tensor
from services.inference.main import Worker
from services.inference.settings import InferenceSettings
from services.trainer.pipeline import TrainRequest, run_job
from tests.fixtures.mlflow_store import MlflowStore
from tests.fixtures.packages import TINY_INT8_MAX_DROP_POINTS, TINY_RECIPE
from tests.fixtures.waiting import until_async


def _register_two_versions(
    base: Path, files: tuple[Path, Path], store: MlflowStore, tmp_path: Path
) -> None:
    for seed in (1, 2):
        run_job(
            TrainRequest(
                data=files[0],
                validation=files[1],
                base_model=str(base),
                name="swap",
                alias=None,
                output=tmp_path / f"v{seed}",
                mlflow_uri=store.tracking_uri,
                train=TINY_RECIPE.model_copy(update={"seed": seed, "epochs": 2}),
                int8_max_drop_points=TINY_INT8_MAX_DROP_POINTS,
            )
        )


def _load(address: str, stop: threading.Event, outcomes: Counter[str]) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))
    request = pb.ModelInferRequest(model_name="swap")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes_tensor([b"the film was great overall"]))
    while not stop.is_set():
        try:
            answer = stub.ModelInfer(request, timeout=10)
            outcomes[f"v{answer.model_version}"] += 1
        except grpc.RpcError as err:
            outcomes[f"error {err.code().name}: {err.details()}"] += 1


@pytest.mark.slow
def test_alias_moves_forward_and_back_under_load_without_a_failure(
    tiny_model_factory: Callable[[str], Path],
    sentiment_files: tuple[Path, Path],
    mlflow_store: MlflowStore,
    tmp_path: Path,
) -> None:
    _register_two_versions(tiny_model_factory("bert"), sentiment_files, mlflow_store, tmp_path)
    registry = Registry(mlflow_store.tracking_uri)
    registry.promote("swap", "1")
    settings = InferenceSettings(
        models=["models:/swap@champion"],
        port=0,
        cache_dir=tmp_path / "cache",
        records=False,
        alias_poll_seconds=0.2,
        mlflow_uri=mlflow_store.tracking_uri,
    )

    async def scenario() -> Counter[str]:
        worker = Worker(settings)
        outcomes: Counter[str] = Counter()
        stop = threading.Event()
        async with running(settings, worker.register, on_shutdown=[worker.stop]) as server:
            await worker.start(f"127.0.0.1:{server.port}")
            clients = [
                threading.Thread(target=_load, args=(f"127.0.0.1:{server.port}", stop, outcomes))
                for _ in range(4)
            ]
            for client in clients:
                client.start()
            try:
                await until_async(lambda: outcomes["v1"] > 20, "answers from v1")
                await asyncio.to_thread(registry.promote, "swap", "2")
                await until_async(lambda: outcomes["v2"] > 20, "answers from v2")
                before = outcomes["v1"]
                await asyncio.to_thread(registry.promote, "swap", "1")
                await until_async(lambda: outcomes["v1"] > before + 20, "answers from v1 again")
            finally:
                stop.set()
                for client in clients:
                    await asyncio.to_thread(client.join)
            # Both versions came and went through the cache, each downloaded once.
            assert sorted(
                p.name
                for p in (tmp_path / "cache" / "swap").iterdir()
                if not p.name.startswith(".")
            ) == ["1", "2"]
            served = [(m.version, sorted(m.aliases)) for m in worker.repository.served()]
            assert served == [("1", ["champion"])]
        return outcomes

    outcomes = asyncio.run(scenario())
    errors = {k: v for k, v in outcomes.items() if k.startswith("error")}
    assert errors == {}
    assert outcomes["v1"] > 40
    assert outcomes["v2"] > 20
