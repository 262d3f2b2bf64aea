"""Every knob of the service, typed, read from the environment (prefix GENRET_) in one place.

Nothing else in service/ reads os.environ: a setting that is not here does not exist, and a
bad value (GENRET_MAX_K=lots) stops the server at startup with one line naming the variable
(load_settings) instead of failing on the first request. An empty value counts as unset, so
docker-compose.yml can pass a setting through as ${NAME:-} and leave its default here. (The
vLLM engine writes one variable of vLLM's own, VLLM_USE_V2_MODEL_RUNNER=0, for the engine
process it starts: see service.engine_vllm.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from genret.decoding import PriorWeights

REPO = Path(__file__).resolve().parents[1]
# the Redis keys' prefix (namespace:...) is a word: "" or a space would put keys outside it
NAMESPACE_PATTERN = r"^\S+$"
# how a search ranks: what `genret evaluate` chooses, /readyz reports and docker-compose.yml passes through
SEARCH_FIELDS = ("beams", "beam_hubness_weight", "added_id_bonus", "rerank_beams", "rerank_weight", "hubness_weight")


def search_weight(description: str):
    """A weight of how a search ranks: 0 (off) by default, finite and >= 0, as the search requires."""
    return Field(0.0, ge=0, allow_inf_nan=False, description=description)


class SettingsError(ValueError):
    """GENRET_* values their settings refuse; the message names each variable and its value."""


def load_settings(**overrides) -> Settings:
    """The settings for an entry point (server, publish, load test), whose user set the environment:
    a bad value is named as the variable they set (GENRET_PORT='abc'), not as a traceback."""
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = ".".join(map(str, error["loc"]))
            message = error["msg"].removeprefix("Value error, ")  # a check across settings names its own
            problems.append(f"GENRET_{field.upper()}={error['input']!r}: {message}" if field else message)
        raise SettingsError("; ".join(problems)) from None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GENRET_", extra="ignore", env_ignore_empty=True)

    # --- what to serve
    model: str = Field("demo", description="a name under model_store/ or a path to a trained model folder")
    model_store: Path = Field(REPO / "model_store", description="where model names are looked up")
    images_dir: Path | None = Field(None, description="where the catalog's images are, when not where training "
                                    "found them (a container's mount); None = the model's recorded images_root")
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="auto = vLLM when it is installed, else transformers")
    device: str | None = Field(None, description="transformers engine device (default: cuda if available)")

    # --- id store
    redis_url: str | None = Field(None, description="None = the id map comes from the model's catalog.json")
    id_store_namespace: str = Field("genret", pattern=NAMESPACE_PATTERN, description="the Redis keys' prefix "
                                    "(namespace:...): a word, no spaces")
    redis_timeout_s: float = Field(2.0, gt=0, description="a Redis call that takes longer is a 503, not a hang")
    public_url: str | None = Field(None, description="base of the image URLs the service serves itself; None = "
                                   "http://localhost:<port>, or http://<host>:<port> for a host not on all or "
                                   "local addresses")

    # --- HTTP server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"

    # --- who may call it
    api_key: SecretStr | None = Field(None, description="when set, /search, /describe and /ask require the header "
                                      "`Authorization: Bearer <key>` (401 otherwise); health, readiness, metrics, "
                                      "docs and /images stay open (an <img> tag sends no header)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins whose web pages may call the API from a browser "
        "(https://search.example.com, or * for any); none by default")

    # --- requests
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    beams: int = Field(10, ge=1, description="beam width; a search uses max(beams, k)")
    rerank_weight: float = search_weight(
        "0 = off; else a search reads a beam of rerank_beams, scores each hit log-probability + this x the "
        "two-tower's query-image similarity (GENIUS's re-ranking), and keeps the top k")
    hubness_weight: float = search_weight(
        "0 = off; else re-ranking also subtracts this x each image's hubness (how close the two-tower put it to "
        "the training captions), so images that were never captioned are not outranked by ones that were")
    rerank_beams: int = Field(50, ge=1, description="the beam width a re-ranked search reads")
    beam_hubness_weight: float = search_weight(
        "0 = off; else the beam search itself subtracts this x each image's hubness from its id's score "
        "(genret.decoding.search_prior), so never-captioned images reach even a narrow beam without re-ranking")
    added_id_bonus: float = search_weight(
        "0 = off; else the beam search adds this many nats to the score of each image added after training "
        "(`genret add`), which the model under-scores for want of pseudo-queries; choose it with "
        "`genret evaluate --added-bonuses` on queries for both added and trained images")
    max_within: int = Field(10_000, ge=1, description="the most images a search may be restricted to "
                            "(POST /search's `within`)")
    max_exclude: int = Field(10_000, ge=1, description="the most images a search may leave out "
                             "(POST /search's `exclude`)")
    max_query_chars: int = Field(1000, ge=1)
    max_answer_tokens: int | None = Field(None, ge=1, le=1024, description=(
        "the most tokens a description or answer runs to; None: the model's own (48, or its longest trained caption)"))
    request_timeout_s: float = Field(30.0, gt=0)

    # --- vLLM
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="on CPU: the fraction of RAM for the KV cache")
    max_model_len: int = Field(2048, ge=64)
    dtype: str = Field("auto", description="auto = float32 on CPU, bfloat16 on GPU")
    enforce_eager: bool | None = Field(None, description="None = True on CPU (no graph capture there)")
    max_num_seqs: int = Field(256, ge=1, description="the most sequences vLLM batches in one step")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [origin.strip() for origin in value.split(",") if origin.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.default_k > self.max_k:
            if "default_k" in self.model_fields_set:
                raise ValueError(f"GENRET_DEFAULT_K={self.default_k} exceeds GENRET_MAX_K={self.max_k}")
            self.default_k = self.max_k
        if self.public_url is None:  # GENRET_PORT=8080 alone must not hand out URLs on port 8000
            local = self.host in ("0.0.0.0", "::", "127.0.0.1", "localhost")
            host = "localhost" if local else f"[{self.host}]" if ":" in self.host else self.host
            self.public_url = f"http://{host}:{self.port}"
        self.public_url = self.public_url.rstrip("/")
        return self

    @property
    def reranks(self) -> bool:
        """Whether a search reads a wider beam and re-scores it (either weight on)."""
        return self.rerank_weight > 0 or self.hubness_weight > 0

    @property
    def search(self) -> dict:
        """The settings that decide how a search ranks (SEARCH_FIELDS)."""
        return {name: getattr(self, name) for name in SEARCH_FIELDS}

    @property
    def search_prior(self) -> PriorWeights:
        """What the beam search itself adds to ids' scores."""
        from genret.decoding import PriorWeights  # torch: not for every importer of the settings

        return PriorWeights(hubness=self.beam_hubness_weight, added_bonus=self.added_id_bonus)

    @property
    def model_path(self) -> Path:
        path = Path(self.model).expanduser()
        return path if path.exists() or os.sep in self.model else self.model_store / self.model

    def resolved_engine(self) -> str:
        if self.engine != "auto":
            return self.engine
        try:
            import vllm  # noqa: F401
        except ImportError:
            return "transformers"
        return "vllm"

    def image_url(self, key: str) -> str:
        from urllib.parse import quote

        return f"{self.public_url}/images/{quote(key)}"
