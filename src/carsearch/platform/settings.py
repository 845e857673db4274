"""One settings class for every process, read from CARSEARCH_* variables.

Built once in the entry point and passed in explicitly; tests construct their own.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from carsearch.platform.errors import ConfigError


class SettingsError(ConfigError):
    """Settings that cannot be used; the message names the variable."""


# The nested groups are plain models, not settings of their own: only Settings reads the
# environment, and only CARSEARCH_* variables (a BaseSettings group would also read
# TORCH, K or RETRAIN_COMMAND without any prefix).
class ThreadSettings(BaseModel):
    """Thread pools: torch, FAISS and Milvus Lite each start one; on 2 cores they fight."""

    model_config = ConfigDict(extra="forbid")

    torch: int = Field(default=2, ge=1, le=256)
    faiss: int = Field(default=1, ge=1, le=256)
    omp: int = Field(default=1, ge=1, le=256)


class DriftSettings(BaseModel):
    """The drift job: kNN density of new embeddings against the indexed collection."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=10, ge=1, le=200, description="Neighbours in the kNN density.")
    percentile: float = Field(
        default=5.0, gt=0.0, lt=50.0,
        description="Reference density percentile under which a new image is novel.",
    )
    min_cluster_size: int = Field(
        default=5, ge=2, le=10_000, description="Novel images that make an isolated cluster."
    )
    min_new: int = Field(default=20, ge=1, description="Fewer new images: no check.")
    max_reference: int = Field(default=20_000, ge=10, le=1_000_000)
    max_new: int = Field(default=20_000, ge=1, le=1_000_000)
    retrain_command: str = Field(
        default="", description="Started (no shell) when isolated clusters are found."
    )
    retrain_cooldown_h: float = Field(default=24.0, ge=0.0, le=24.0 * 365)

    @field_validator("retrain_command")
    @classmethod
    def _command_splits(cls, v: str) -> str:
        try:
            shlex.split(v)
        except ValueError as exc:
            raise ValueError(f"cannot split into arguments ({exc})") from None
        return v


class RetrainSettings(BaseModel):
    """The retrain job (`carsearch retrain run`, or `serve --retrain-every`): what a
    retrain trains on, from what, for how long, and what it must beat."""

    model_config = ConfigDict(extra="forbid")

    data: Path | None = Field(
        default=None, description="The labelled data set (Stanford layout) every retrain "
        "starts from; default DATA_DIR/catalogue.")
    base: str = Field(
        default="serving", description="'serving' (continue from the serving version), "
        "'base' (CARSEARCH_BASE_MODEL) or a model dir / hub id.")
    steps: int = Field(default=120, ge=1, le=1_000_000, description="Optimizer steps.")
    batch_size: int = Field(default=32, ge=2, le=4096)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    full: bool | None = Field(default=None, description="Train every weight (None: the "
                              "trainer's rule: full for a base with no pre-training).")
    metric: str = Field(default="mAP", description="What the candidate must at least "
                        "equal on the held-out split to be promoted.")
    test_share: float = Field(default=0.25, gt=0.0, lt=1.0, description="Share of each "
                              "newly labelled class held out for the evaluation.")
    lease_s: float = Field(default=600.0, ge=1.0, le=86_400.0, description="A running "
                           "retrain not heard of for this long is declared interrupted.")


class DownloadSettings(BaseModel):
    """URL manifests' downloads (ingest/download.py, ingest/netguard.py)."""

    model_config = ConfigDict(extra="forbid")

    allow_networks: str = Field(
        default="", description="Comma-separated CIDRs a manifest's URLs (and their "
        "redirects) may reach besides public addresses, e.g. 127.0.0.0/8 or 10.1.2.0/24; "
        "empty: public addresses only. The cloud metadata addresses are never reached.")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v: str) -> str:
        import ipaddress

        for item in (i.strip() for i in v.split(",")):
            if item:
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"not a network: {item!r} (use CIDRs like "
                                     "127.0.0.0/8, comma-separated)") from None
        return v


class IngestSettings(BaseModel):
    """The ingest line: how the inbox pairs images with their sidecars."""

    model_config = ConfigDict(extra="forbid")

    settle_s: float = Field(
        default=2.0, ge=0.0, le=3600.0,
        description="Seconds an inbox image waits for its sidecar (and a sidecar for its "
        "image); a sidecar with no image after this long is removed, with a log line.")
    done_retention_days: float = Field(
        default=7.0, ge=0.0, le=36_500.0,
        description="Days a finished (done) queue row is kept before the workers delete "
        "it; 0 keeps them forever. Queued, running, failed and dead rows are never "
        "deleted. Keep it above the 5-minute window `ingest status` counts throughput "
        "over.")
    prune_interval_s: float = Field(
        default=600.0, ge=1.0, le=86_400.0,
        description="How often a worker deletes the done rows older than the retention "
        "(seconds; between batches, at most this often).")


class Settings(BaseSettings):
    """Everything a carsearch process needs to know about its surroundings."""

    model_config = SettingsConfigDict(
        env_prefix="CARSEARCH_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    data_dir: Path = Field(default=Path("data"), description="Root of all local state.")
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL; empty means a SQLite file under data_dir.",
    )
    milvus_uri: str = Field(
        default="",
        description="Milvus Lite file path or http://host:19530; empty means data_dir/milvus.db.",
    )
    milvus_token: str = Field(default="", repr=False,
                              description="Milvus server token (user:password).")
    milvus_consistency: Literal["Strong", "Session", "Bounded", "Eventually"] = Field(
        default="Session",
        description="Consistency of searches on a Milvus server: Session sees this "
        "process's own writes at once and other processes' within a time tick; reads "
        "that decide repairs (reconcile, re-index, counts, scans) are always Strong.",
    )
    milvus_search_ef: int = Field(
        default=256, ge=1, le=32_768,
        description="HNSW's ef for searches (raised to k where k is larger): more "
        "candidates, better recall, slower. Text queries against image vectors need more "
        "than image queries: at 100k rows of a trained model, text recall@10 0.92-0.98 at "
        "ef 64, 0.995-0.999 at 256, at the same one-query latency (docs/BENCHMARKS.md, "
        "\"The search ef and the interim index's nprobe\"); check with `carsearch "
        "evaluate ann`. The same number as vectors.milvus.DEFAULT_SEARCH_EF.")
    model_dir: Path = Field(default=Path(""), description="Where model versions are stored.")
    base_model: str = Field(
        default="",
        description="Hub id or directory of the SigLIP base; empty means the compact local one.",
    )
    device: str = Field(
        default="auto",
        description="Torch device of the encoder: auto (cuda where torch sees one), cpu, "
        "cuda, cuda:N.",
    )
    exact_gpu: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Search the FAISS exact index on a GPU: auto (where FAISS is a GPU "
        "build and sees one), on (fail without one), off.",
    )
    encoder: Literal["torch", "onnx"] = Field(
        default="torch",
        description="What runs the model for search and ingest: PyTorch, or ONNX Runtime "
                    "over an export of the version (made on first use).",
    )
    encode_batch_size: int = Field(default=64, ge=1, le=4096)
    threads: ThreadSettings = Field(default_factory=ThreadSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    ollama_host: str = Field(default="http://127.0.0.1:11434")
    ollama_model: str = Field(default="qwen2.5:14b")
    image_dir: Path = Field(default=Path(""), description="Images the search page may serve.")
    ui_auth: str = Field(default="", repr=False,
                         description="user:password to require a login on the page.")
    ui_serve_originals: bool = Field(
        default=False,
        description="Let the page serve the full-size files in image_dir, not only the "
        "thumbnails in image_dir/_thumbs.",
    )
    ui_searches_per_s: float = Field(
        default=5.0, gt=0.0, le=10_000.0,
        description="Searches (text, image, more-like-this, classify) one client may "
        "make a second on the page, sustained.",
    )
    ui_search_burst: int = Field(
        default=20, ge=1, le=100_000, description="Searches one client may make at once "
        "before ui_searches_per_s applies (the token bucket's size).",
    )
    ui_max_uploads: int = Field(
        default=2, ge=1, le=1_000,
        description="Uploads (and image searches / classifications) one client may have "
        "in flight at once.",
    )
    ui_login_failures: int = Field(
        default=5, ge=1, le=10_000,
        description="Failed logins one client, or one user name, may have within "
        "ui_login_window_s; past it the page answers 429 without checking the password.")
    ui_login_window_s: float = Field(
        default=60.0, gt=0.0, le=86_400.0,
        description="The window the failed logins are counted over (seconds).")
    ui_trusted_proxies: str = Field(
        default="",
        description="Addresses or CIDRs (comma-separated) of the reverse proxies whose "
        "X-Forwarded-For / X-Forwarded-Proto the page believes (uvicorn's "
        "forwarded_allow_ips); empty: none, a client is the connection's peer.")
    max_image_pixels: int = Field(default=40_000_000, ge=1024)
    max_query_chars: int = Field(default=500, ge=1)
    search_max_results: int = Field(
        default=1_000, ge=1, le=100_000,
        description="The most results one query may page through (its cursor stops there).")
    search_vocabulary_ttl_s: float = Field(
        default=10.0, ge=0.0, le=3_600.0,
        description="How long the search service keeps the filter vocabulary (the makes, "
        "colours, bodies, sources and years among the indexed images) it reads queries "
        "against before reading it again (seconds; 0: read it for every query). A label "
        "given on the page clears it at once.")
    search_mirror: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Serve searches from an exact in-memory mirror of the Milvus "
        "collection; auto means on for Milvus Lite, off for a server.",
    )
    health_host: str = Field(
        default="127.0.0.1",
        description="Address of the /healthz and /metrics port of long-running processes.",
    )
    log_level: str = Field(default="INFO")
    # Secrets from files (Compose secrets, /run/secrets/...): CARSEARCH_<NAME>_FILE names a
    # file whose contents, less the trailing newline, are the value of CARSEARCH_<NAME>.
    # Setting both is an error. database_password goes into database_url, which then must
    # not carry a password of its own.
    database_password: str = Field(default="", repr=False,
                                   description="Password of the database_url's user.")
    database_password_file: Path | None = None
    milvus_token_file: Path | None = None
    ui_auth_file: Path | None = None

    @field_validator("database_password_file", "milvus_token_file", "ui_auth_file")
    @classmethod
    def _secret_file_readable(cls, v: Path | None) -> Path | None:
        if v is not None:
            _read_secret(v)
        return v

    @field_validator("milvus_uri")
    @classmethod
    def _milvus_uri(cls, v: str) -> str:
        if v and "://" in v and not v.startswith(("http://", "https://", "tcp://", "unix://")):
            raise ValueError("must be a Milvus Lite file path or an http(s):// server URI")
        return v

    @field_validator("ui_trusted_proxies")
    @classmethod
    def _proxies(cls, v: str) -> str:
        import ipaddress

        for item in (i.strip() for i in v.split(",")):
            if item and item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"not an address or network: {item!r}") from None
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        if v and not v.startswith(("sqlite", "postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, v: str) -> str:
        level = v.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        for name in SECRET_FILE_FIELDS:
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            if getattr(self, name):
                raise ValueError(f"CARSEARCH_{name.upper()} and CARSEARCH_{name.upper()}_FILE "
                                 "are both set: set one")
            setattr(self, name, _read_secret(path))
        if self.database_password:
            if not self.database_url:
                raise ValueError("CARSEARCH_DATABASE_PASSWORD needs CARSEARCH_DATABASE_URL")
            from sqlalchemy.engine import make_url

            url = make_url(self.database_url)
            if url.password is not None:
                raise ValueError("CARSEARCH_DATABASE_URL carries a password and "
                                 "CARSEARCH_DATABASE_PASSWORD(_FILE) is set: set one")
            self.database_url = url.set(password=self.database_password).render_as_string(
                hide_password=False)
        return self

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'carsearch.db').resolve()}"
        if not self.milvus_uri:
            self.milvus_uri = str((self.data_dir / "milvus.db").resolve())
        if self.model_dir == Path(""):
            self.model_dir = self.data_dir / "models"
        if self.image_dir == Path(""):
            self.image_dir = self.data_dir / "images"
        if not self.base_model:
            self.base_model = str(self.data_dir / "base" / "compact-siglip")
        return self

    @property
    def milvus_is_lite(self) -> bool:
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "unix://"))

    @property
    def mirror_enabled(self) -> bool:
        """Whether searches are served from the in-memory mirror (platform/vectors/mirror.py).

        Only a process that sees every write may mirror: true of a Milvus Lite file,
        which one process opens at a time, not of a server that others write to.
        """
        if self.search_mirror == "auto":
            return self.milvus_is_lite
        return self.search_mirror == "on"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.model_dir, self.image_dir):
            d.mkdir(parents=True, exist_ok=True)


SECRET_FILE_FIELDS = ("database_password", "milvus_token", "ui_auth")


def _read_secret(path: Path) -> str:
    """A secret file's contents without the trailing newline; ValueError (never the
    contents) when it cannot be read or is empty."""
    try:
        value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the secret file {path} ({type(exc).__name__})") from None
    if not value:
        raise ValueError(f"the secret file {path} is empty")
    return value


def _variable_name(loc: tuple[int | str, ...]) -> str:
    return "CARSEARCH_" + "__".join(str(p).upper() for p in loc)


def load_settings(**overrides: object) -> Settings:
    """Build Settings from the environment, turning validation errors into one line each."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = [f"{_variable_name(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
                 for e in exc.errors()]
        raise SettingsError("invalid settings: " + "; ".join(lines)) from None


def apply_thread_settings(settings: Settings) -> None:
    """Size the OpenMP/MKL pools before any library starts them.

    torch's intra-op pool is set by the encoder and the trainer (Settings.threads.torch),
    FAISS's by the exact index (Settings.threads.faiss); Milvus Lite's server process
    inherits these variables. CARSEARCH_THREADS__OMP, when set, wins over an
    OMP_NUM_THREADS already in the environment; otherwise that one is kept. The CLI calls
    this before it imports NumPy, torch or FAISS, whose OpenMP pools size themselves once,
    when they start.
    """
    explicit = "omp" in settings.threads.model_fields_set
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        if explicit:
            os.environ[var] = str(settings.threads.omp)
        else:
            os.environ.setdefault(var, str(settings.threads.omp))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
