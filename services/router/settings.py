"""Router settings: `LOOPLINE_ROUTER_*` (plus the shared `LOOPLINE_REDIS_URL` etc.)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from loopline.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """Everything a router reads at startup. Flags of `loopline serve router` map onto it."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_ROUTER_")

    port: int = Field(default=8000, ge=0, le=65535, description="Public gRPC port; 0 = any free.")
    default_model: str = Field(
        default="sentiment",
        min_length=1,
        description="Model a Classify without a model name goes to.",
    )
    workers: list[str] = Field(
        default_factory=list,
        description="Static host:port list of Open Inference Protocol servers (ours, Triton, "
        "MLServer), used besides the workers found through Redis heartbeats.",
    )
    discover_workers: bool = Field(
        default=True, description="Find workers through their heartbeats in Redis."
    )
    worker_key_prefix: str = Field(
        default="loopline:workers:", description="Redis key prefix of worker heartbeats."
    )
    discovery_seconds: float = Field(
        default=0.5, gt=0, description="How often the worker list is refreshed."
    )
    classify_token: SecretStr | None = Field(
        default=None,
        description="When set, Classify, ClassifyBatch, ClassifyStream and Feedback need this "
        "token (or the admin token) as 'authorization: Bearer <token>'.",
    )
    timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Deadline given to a classification whose caller set none.",
    )
    max_attempts: int = Field(
        default=2,
        ge=1,
        le=5,
        description="Tries per request: a try that meets UNAVAILABLE or RESOURCE_EXHAUSTED "
        "moves to another worker while the deadline allows.",
    )
    eject_after: int = Field(
        default=3, ge=1, description="Consecutive transport failures that eject a worker."
    )
    probe_seconds: float = Field(
        default=2.0, gt=0, description="How often an ejected worker is probed (ServerReady)."
    )
    max_batch_texts: int = Field(
        default=256, ge=1, description="Most items in one ClassifyBatch call."
    )
    max_text_chars: int = Field(
        default=20_000, ge=1, description="Longer texts are refused with INVALID_ARGUMENT."
    )
    coalesce_per_worker: int = Field(
        default=2,
        ge=0,
        description="Calls in flight per worker for one model before concurrent texts for it "
        "wait and go together in one worker call (a lone request never waits); 0: never merge.",
    )
    coalesce_max_texts: int = Field(
        default=64, ge=1, description="Most texts in one merged worker call."
    )
    stream_window: int = Field(
        default=256,
        ge=1,
        description="Items of one ClassifyStream in flight at once, each until its answer is "
        "written; the stream reads no further meanwhile (back-pressure).",
    )
    experiment_poll_seconds: float = Field(
        default=0.25,
        gt=0,
        le=1.0,
        description="How often the experiment version key is checked (changes show within 1 s).",
    )
    keep_served_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How often running experiments are checked for a version no worker serves "
        "any more (its workers replaced by a rollout or an autoscaler); such a version is "
        "loaded again. 0 = never.",
    )
    model_load_timeout_seconds: float = Field(
        default=180.0,
        gt=0,
        description="How long starting an experiment may wait for workers to load its versions.",
    )
    language_routes: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Content-based routing, per public model: language -> model, e.g. "
        '{"sentiment": {"pt": "sentiment-pt"}}. Checked before experiments apply.',
    )
    languages: list[str] = Field(
        default_factory=list,
        description="Languages the detector chooses among (ISO 639-1); empty: the languages "
        "named in language_routes plus English.",
    )
    feedback_stream: str = Field(
        default="loopline:feedback", description="Redis stream feedback labels are appended to."
    )
    feedback_maxlen: int = Field(
        default=1_000_000, ge=1000, description="Approximate cap of the feedback stream."
    )
    shadow_max_in_flight: int = Field(
        default=256,
        ge=0,
        description="Shadow copies in flight at once; beyond it they are skipped and counted.",
    )

    @field_validator("language_routes")
    @classmethod
    def _routes_name_models(cls, routes: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for model, by_language in routes.items():
            for language, target in by_language.items():
                if not target.strip():
                    raise ValueError(f"{model}: language {language!r} routes to an empty model")
        return routes

    def language_set(self) -> list[str]:
        """Languages to detect among: the configured ones, or English plus every routed one."""
        if self.languages:
            return sorted(set(self.languages))
        routed = {language for table in self.language_routes.values() for language in table}
        return sorted(routed | {"en"})
