"""ServeConfig: every knob of `feedloop serve`, with its default and the reason behind it.

Built once at start-up by feedloop.core.config (flags > FEEDLOOP_* env > TOML [serve] > these
defaults) and passed down; nothing in the server reads the environment on its own.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from feedloop.core.config import default_data_dir, is_postgres_url
from feedloop.core.errors import ConfigError
from feedloop.core.exploration import Exploration


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServeConfig:
    host: str = field(default="127.0.0.1", metadata=_help("address to bind the gRPC server to"))
    port: int = field(default=50051, metadata=_help("gRPC port; 0 picks a free one"))
    metrics_port: int = field(
        default=9464, metadata=_help("Prometheus /metrics HTTP port; 0 picks a free one")
    )
    http_port: int | None = field(
        default=None,
        metadata=_help(
            "port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models, /v1/feedback) on host, beside gRPC; unset: off; 0 picks a free one"
        ),
    )
    metrics_host: str | None = field(
        default=None, metadata=_help("address for the metrics endpoint; unset: same as host")
    )
    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata=_help("where the default checkpoint and the embedded store and registry live"),
    )
    store: str | None = field(
        default=None,
        metadata=_help(
            "replay store: a SQLite path or a postgresql:// URL (unset: DATA_DIR/replay.sqlite3)"
        ),
    )
    registry: str | None = field(
        default=None,
        metadata=_help(
            "model registry: a directory or a postgresql:// URL (unset: DATA_DIR/registry)"
        ),
    )
    # -- batching: one model process computes batches; latency is bounded by max_queue_delay_ms
    max_batch_size: int = field(
        default=32,
        metadata=_help(
            "most rows (candidates) in one batched forward pass; the policy's "
            "throughput saturates near 32 rows on CPU, larger batches only add latency"
        ),
    )
    max_queue_delay_ms: float = field(
        default=2.0,
        metadata=_help(
            "how long the first request of a batch waits for company; trades "
            "latency for throughput at low load"
        ),
    )
    max_queue_size: int = field(
        default=1024,
        metadata=_help(
            "most Generate requests waiting for the batcher; beyond it "
            "RESOURCE_EXHAUSTED (bounded memory, fast failure)"
        ),
    )
    # -- limits on what one request may ask for
    max_candidates: int = field(default=8, metadata=_help("cap on num_candidates"))
    max_prompt_chars: int = field(default=512, metadata=_help("cap on prompt length"))
    max_prompt_tokens: int = field(
        default=64,
        metadata=_help(
            "cap on prompt word/punctuation pieces after normalisation: NFKC can expand one "
            "character into many, and one long prompt would stall its whole batch"
        ),
    )
    max_tokens_cap: int = field(default=48, metadata=_help("cap on sampling.max_tokens"))
    default_max_tokens: int = field(
        default=16, metadata=_help("max_tokens when a request leaves it 0")
    )
    max_correction_chars: int = field(default=1024, metadata=_help("cap on correction text"))
    max_message_bytes: int = field(
        default=1 << 20, metadata=_help("largest gRPC message accepted or sent")
    )
    # -- exploration (feedloop.core.exploration)
    explore_share: float = field(
        default=0.05,
        metadata=_help(
            "share of eligible Generate requests (those that set no sampling parameter but "
            "max_tokens and pin no version) served with the explore_* parameters, logged with "
            "their exact behaviour log-probabilities and served_as=exploration, so phrases the "
            "policy has learned to avoid keep being rated (a few percent, like decision "
            "services' exploration budgets; 0: off)"
        ),
    )
    explore_temperature: float = field(
        default=1.5, metadata=_help("sampling temperature of an explored request (> 0)")
    )
    explore_top_k: int = field(
        default=0, metadata=_help("top-k of an explored request (0: no top-k filtering)")
    )
    explore_top_p: float = field(
        default=1.0, metadata=_help("top-p of an explored request (1: no nucleus filtering)")
    )
    explore_version_share: float = field(
        default=0.5,
        metadata=_help(
            "part of the explored requests served instead by an older version (the root of "
            "live's lineage, then the latest earlier live versions, in turn) with the "
            "request's own sampling parameters, logged with that version and served_as="
            "exploration: its ratings keep the evidence about older versions current, so the "
            "trainer can bring one back (issue 21). 0.5 of the default 5%: 2.5% of eligible "
            "requests. 0: the live version at the explore_* parameters only"
        ),
    )
    explore_versions: int = field(
        default=2,
        metadata=_help("older versions held beside live that take turns serving that part"),
    )
    # -- security
    auth_keys_file: Path | None = field(
        default=None,
        metadata=_help("TOML file of API keys and roles; unset: auth off (loopback only)"),
    )
    tls_cert: Path | None = field(default=None, metadata=_help("PEM server certificate"))
    tls_key: Path | None = field(default=None, metadata=_help("PEM server private key"))
    tls_client_ca: Path | None = field(
        default=None, metadata=_help("PEM CA bundle; set: clients must present a cert (mTLS)")
    )
    metrics_tls_cert: Path | None = field(
        default=None,
        metadata=_help("PEM certificate of the metrics endpoint (HTTPS); unset: plain HTTP"),
    )
    metrics_tls_key: Path | None = field(
        default=None, metadata=_help("PEM private key of metrics_tls_cert")
    )
    metrics_auth_file: Path | None = field(
        default=None,
        metadata=_help(
            "TOML file of the bearer tokens and basic-auth users (sha256) allowed to scrape "
            "/metrics; unset: no credentials asked"
        ),
    )
    rate_limit_rps: float = field(
        default=0.0,
        metadata=_help(
            "requests per second per API key (with auth off, all callers share one "
            "bucket); 0: no rate limit"
        ),
    )
    rate_limit_burst: int = field(
        default=100, metadata=_help("token bucket size per API key (requests)")
    )
    rate_limit_per_candidate: bool = field(
        default=True,
        metadata=_help(
            "charge Generate one token per candidate (num_candidates), as it costs one row of "
            "compute each; false: one per call"
        ),
    )
    rate_limit_per_event: bool = field(
        default=True,
        metadata=_help(
            "charge a SubmitStream one token per event it carries; false: only its opening "
            "(one call), which lets one stream carry any number of events"
        ),
    )
    max_streams_per_key: int = field(
        default=16,
        metadata=_help(
            "open SubmitStream calls per API key on this server (each holds up to 1,024 events "
            "in flight); one more is RESOURCE_EXHAUSTED"
        ),
    )
    stream_idle_timeout_s: float = field(
        default=300.0,
        metadata=_help(
            "a SubmitStream that sends no event for this long is closed with DEADLINE_EXCEEDED "
            "(its acknowledged events stay stored); 0: never"
        ),
    )
    # -- model
    policy: Path | None = field(
        default=None,
        metadata=_help(
            "the model an empty registry starts with: a feedloop checkpoint directory, or a "
            "Hugging Face causal-LM directory (config.json, *.safetensors, tokenizer.json; "
            "needs the hf extra), imported with a fresh value head; unset: the default policy"
        ),
    )
    prompt_template: str = field(
        default="{keywords}",
        metadata=_help(
            "how a Hugging Face model imported by --policy reads a prompt: text with "
            "{keywords} where the request's prompt goes"
        ),
    )
    torch_threads: int = field(
        default=1,
        metadata=_help("torch intra-op threads of the model process; 1 leaves a core for gRPC"),
    )
    keep_versions: int = field(
        default=3, metadata=_help("model versions kept loaded (live + recent, for pins)")
    )
    registry_poll_interval_s: float = field(
        default=0.2, metadata=_help("how often a directory registry is checked for a new live")
    )
    # -- writers
    generation_buffer_size: int = field(
        default=16384,
        metadata=_help("generations waiting to be written; full: Generate answers UNAVAILABLE"),
    )
    feedback_queue_size: int = field(
        default=8192, metadata=_help("feedback events waiting for commit; full: UNAVAILABLE")
    )
    write_batch_max: int = field(default=2048, metadata=_help("most rows per group commit"))
    shadow_queue_size: int = field(
        default=1024,
        metadata=_help(
            "live generations waiting for the shadow version's scores; full: further sampled "
            "requests are not scored (counted), so shadow scoring never holds up serving"
        ),
    )
    feedback_commit_interval_ms: float = field(
        default=50.0,
        metadata=_help(
            "under sustained load, the longest a feedback group commit waits after the previous "
            "one began, gathering events: larger groups cost less CPU per event, and acks wait "
            "up to this long (the sweep behind the default is in docs/performance.md); 0: commit "
            "as soon as the previous commit ends"
        ),
    )
    unknown_generation_wait_ms: float = field(
        default=3000.0,
        metadata=_help(
            "how long feedback naming a generation this server cannot find waits for it to "
            "appear in the replay store before NOT_FOUND: another replica sharing the store may "
            "have served it and not committed it yet; 0: answer NOT_FOUND at once"
        ),
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata=_help("how long in-flight calls may take to finish on SIGTERM")
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info",
        metadata=_help("logging level (logs go to stderr; debug: a line per request and event)"),
    )
    log_format: Literal["text", "json"] = field(
        default="text",
        metadata=_help(
            "text, or json: one object a line with generation_ids, event_id, request_id and "
            "version as fields"
        ),
    )

    def __post_init__(self) -> None:
        positive = (
            "max_batch_size",
            "max_queue_size",
            "max_candidates",
            "max_prompt_chars",
            "max_prompt_tokens",
            "max_tokens_cap",
            "default_max_tokens",
            "max_correction_chars",
            "max_message_bytes",
            "rate_limit_burst",
            "max_streams_per_key",
            "torch_threads",
            "keep_versions",
            "generation_buffer_size",
            "feedback_queue_size",
            "write_batch_max",
            "shadow_queue_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_queue_delay_ms",
            "feedback_commit_interval_ms",
            "unknown_generation_wait_ms",
            "rate_limit_rps",
            "stream_idle_timeout_s",
            "registry_poll_interval_s",
            "shutdown_grace_s",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        try:
            self.exploration  # noqa: B018 - raises ValueError naming a bad explore_* knob
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.default_max_tokens > self.max_tokens_cap:
            raise ConfigError("default_max_tokens must not exceed max_tokens_cap")
        if bool(self.metrics_tls_cert) != bool(self.metrics_tls_key):
            raise ConfigError("metrics_tls_cert and metrics_tls_key must be given together")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"{name} must be in 0..65535")

    @property
    def exploration(self) -> Exploration:
        """Which requests are explored and how (ValueError naming a bad explore_* knob)."""
        return Exploration(
            self.explore_share,
            self.explore_temperature,
            self.explore_top_k,
            self.explore_top_p,
            self.explore_version_share,
            self.explore_versions,
        )

    @property
    def store_location(self) -> str:
        return self.store or str(self.data_dir / "replay.sqlite3")

    @property
    def registry_location(self) -> str:
        return self.registry or str(self.data_dir / "registry")

    def local_volumes(self) -> dict[str, Path]:
        """The directories whose disks the server writes to: data, and the store's and the
        registry's where they are local (a PostgreSQL server's disk is its own to watch)."""
        volumes = {"data": self.data_dir}
        if not is_postgres_url(self.store_location):
            volumes["store"] = Path(self.store_location).parent
        if not is_postgres_url(self.registry_location):
            volumes["registry"] = Path(self.registry_location)
        return volumes

    @property
    def auth_enabled(self) -> bool:
        return self.auth_keys_file is not None


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (auth may be off only there)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
