"""App settings (PAGECHAT_* environment variables), separate from the engine's EngineConfig."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class AppSettings(BaseSettings):
    """What the server needs beyond the engine: where data lives, who may log in, limits."""

    model_config = SettingsConfigDict(env_prefix="PAGECHAT_", extra="ignore", protected_namespaces=())

    host: str = "127.0.0.1"
    port: int = 8000
    demo: bool = Field(False, description="tiny random checkpoint: answers are random text")
    data_dir: Path = Field(Path("data"), description="SQLite database, uploads, secrets")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite in data_dir")
    auth_users: str = Field("", description="user:password pairs, comma-separated; empty = local user")
    api_keys: str = Field("", description="comma-separated keys required by /v1/* when set")
    engine_url: str | None = Field(None, description="external OpenAI-compatible server to use")
    engine_api_key: str | None = Field(None, description="bearer key for engine_url")
    served_model_name: str | None = Field(None, description="model id shown by /v1/models")
    max_upload_mb: int = Field(50, ge=1)
    passage_share: float = Field(
        0.6, gt=0, le=0.9,
        description="share of the context that passages of over-context documents may take (app.chat.long_documents)",
    )
    max_request_mb: int = Field(16, ge=1, description="largest /v1 request body (413 beyond)")
    max_queued_requests: int = Field(256, ge=1, description="API answers 503 beyond this")
    cors_allow_origins: str = Field("", description="comma-separated origins; empty = closed")
    shared_cache: bool = Field(
        False, description="one prefix cache for all users and API keys (app.serving.tenancy)"
    )
    max_unpacked_mb: int = Field(
        100, ge=1, description="XML an uploaded Office file may inflate to (app.documents.limits)"
    )
    parse_memory_mb: int = Field(2048, ge=64, description="memory of each document-parsing process")
    parse_timeout_s: float = Field(300.0, gt=0, description="wall time to parse one document")
    parse_workers: int = Field(2, ge=1, description="documents parsed at once (worker processes)")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT, how long answers in flight may run before abort"
    )
    rate_limit_rpm: int = Field(
        0, ge=0, description="requests per minute per API key and chat user; 0 = off"
    )
    rate_limit_tpm: int = Field(
        0, ge=0, description="tokens (prompt + answer) per minute per API key and chat user; 0 = off"
    )
    # Sign-in, sessions and the endpoints around them (app/serving/sessions.py, login_guard.py,
    # ops_access.py, security_headers.py).
    session_hours: float = Field(24.0, gt=0, description="lifetime of a login (its token and cookie)")
    cookie_secure: bool = Field(
        False, description="Secure cookies always (else only on requests that came over HTTPS)"
    )
    trusted_proxies: str = Field(
        "127.0.0.1", description="addresses whose X-Forwarded-For/-Proto are believed (uvicorn)"
    )
    metrics_token: str = Field("", description="bearer token for /metrics and /pagechat/status")
    api_docs: str = Field("auto", description="/docs and /openapi.json: auto (off with keys or users), true, false")
    # Upload quotas (app/serving/upload_quota.py); 0 = no limit.
    upload_files_per_chat: int = Field(50, ge=0)
    upload_mb_per_chat: int = Field(500, ge=0)
    upload_files_per_day: int = Field(500, ge=0)
    upload_mb_per_day: int = Field(2000, ge=0)

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def is_shared(self) -> bool:
        """Keys or password users are set: the server is meant for more than one person."""
        return bool(self.api_key_list() or self.auth_users.strip())

    def docs_enabled(self) -> bool:
        choice = self.api_docs.strip().lower()
        if choice not in ("auto", "true", "false", "1", "0"):
            raise ValueError(f"PAGECHAT_API_DOCS must be auto, true or false, got {self.api_docs!r}")
        return choice in ("true", "1") or (choice == "auto" and not self.is_shared())

    def sqlalchemy_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'pagechat.db').resolve()}"
