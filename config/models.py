"""Typed settings: what a commsync YAML file may say, with defaults a user would choose."""

from __future__ import annotations

import ipaddress
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from commsync.connectors.phones import region_is_known, to_e164

from .auth import MailboxAuth
from .secrets import SecretError, check_secret, read_secret

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")
_CLOCK = re.compile(r"^\s*(\d+):([0-5]\d)(?::([0-5]\d(?:\.\d+)?))?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> Any:
    """Accept `90`, `90s`, `15m`, `2h`, `1d`, `1h30m`, `01:30:00` and ISO 8601 (`PT15M`); refuse the rest, saying how."""
    if not isinstance(value, str) or value.strip().upper().startswith("P"):
        return value
    clock = _CLOCK.match(value)
    if clock:
        return timedelta(hours=int(clock.group(1)), minutes=int(clock.group(2)), seconds=float(clock.group(3) or 0))
    total, pos, text = 0.0, 0, value.strip()
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if part is None or part.end() == pos or (part.group(2) is None and (pos or part.end() < len(text))):
            raise ValueError(f"{value!r} is not a duration: write it as 90s, 15m, 2h, 1d, 1h30m or 01:30:00")
        total += float(part.group(1)) * _UNITS[part.group(2)]
        pos = part.end()
    if not text:
        raise ValueError("an empty duration: write it as 90s, 15m, 2h, 1d, 1h30m or 01:30:00")
    return timedelta(seconds=total)


# Every duration in the config: "90s", "15m", "1h30m", "01:30:00" or seconds (see parse_duration).
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Model(BaseModel):
    # Typos in a config file must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class MongoSettings(_Model):
    uri: str = Field(
        default="mongodb://localhost:27017",
        description="MongoDB connection string; `memory://` keeps everything in this process only: nothing is kept.",
    )
    database: str = Field(
        default="commsync",
        description="The database holding `records`, `customer_history`, `sync_state` and the other collections (and your customers).",
    )
    server_selection_timeout: Duration = Field(
        default=timedelta(seconds=10), description="How long to wait for a MongoDB server to answer."
    )
    socket_timeout: Duration = Field(
        default=timedelta(minutes=5),
        description="Give up on one network read from MongoDB after this long: a connection that died silently (no reset) fails instead of hanging; keep it above your slowest aggregation.",
    )


    @property
    def is_memory(self) -> bool:
        return self.uri.startswith("memory://")

    def __repr_args__(self):  # the URI may carry a password
        for key, value in super().__repr_args__():
            yield key, (_redact_uri(value) if key == "uri" else value)


def _redact_uri(uri: str) -> str:
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", uri)


class CustomersSettings(_Model):
    collection: str = Field(
        default="customers",
        description=(
            "The CRM's customers `{_id, name, emails: [...], phones: [...]}`; read only, "
            "unless `customers.auto_create` or `commsync customers import` writes to it."
        ),
    )
    auto_create: Literal["none", "sent", "sent_and_received"] = Field(
        default="none",
        description="`sent` / `sent_and_received`: create customers (`created_by: commsync`) for unmatched external participants of sent (or all) mail.",
    )
    keep_orphans: bool = Field(
        default=False, description="`customers forget` keeps the records left with no customer instead of deleting them."
    )


class RetentionSettings(_Model):
    days: int | None = Field(default=None, ge=1, description="Delete records older than this many days (daily, and `commsync purge`); default: keep all.")


class RematchSettings(_Model):
    interval: Duration = Field(
        default=timedelta(hours=1), description="The daemon re-links records that matched no customer at least this often."
    )



class CaptureSettings(_Model):
    policy: Literal["all", "matched"] = Field(
        default="all", description="`matched`: records that match no customer are not stored; `capture: matched` is shorthand."
    )
    max_content_chars: int = Field(default=100_000, ge=1_000, description="Longer content is cut, `content_truncated: true`.")
    max_message_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=64 * 1024,
        description="At most this many bytes of one message are downloaded; the rest is not.",
    )
    max_batch_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024 * 1024,
        description="A batch holds at most this many message bytes, so large mail cannot exhaust memory.",
    )


class HttpSettings(_Model):
    listen: str | None = Field(
        default=None,
        description="`host:port` for `/healthz` and `/metrics`, e.g. `127.0.0.1:9464` (default: off). No authentication: keep it on loopback.",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
        return value


class DaemonSettings(_Model):
    poll_interval: Duration = Field(default=timedelta(minutes=1), description="Pause between passes over a source.")
    backoff_max: Duration = Field(default=timedelta(minutes=10), description="Cap of the exponential, jittered retry delay of a failing source.")
    parse_workers: int | None = Field(default=None, ge=1, description="Processes that parse mail (default: one per core).")
    max_sources: int | None = Field(default=None, ge=1, description="Most sources this instance works at once (default: its fair share).")
    lease_ttl: Duration = Field(
        default=timedelta(seconds=60), description="A source whose instance stopped renewing its lease goes to another after this (at least `1s`)."
    )
    instance: str | None = Field(default=None, description="This instance's name in leases and `commsync status` (default: `hostname/pid`).")
    auth_backoff_max: Duration = Field(
        default=timedelta(hours=4),
        description="Longest wait between logins of a source whose credentials are refused (the first retry comes after about a minute).",
    )
    park_after: Duration = Field(
        default=timedelta(days=3),
        description="Park a source whose credentials have been refused this long: no more logins until its config changes or `commsync source resume`. `0` = never.",
    )
    verify_every: Duration = Field(
        default=timedelta(hours=24),
        description="Run `commsync verify` on each source this often, after a pass that caught up (`0` = never).",
    )
    shutdown_timeout: Duration = Field(
        default=timedelta(seconds=60),
        description="On stop, wait this long for the batches in hand to be stored, then exit anyway (keep it below the unit's `TimeoutStopSec`).",
    )
    http: HttpSettings = Field(default=HttpSettings(), description="The optional HTTP listener for `/healthz` and `/metrics`.")

    @field_validator("lease_ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("must be at least 1s")
        return value


def is_loopback(host: str) -> bool:
    """True for this machine's own addresses, where nothing travels over a network."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _given(model: BaseModel, key: str) -> list[str]:
    """Which of ``key``, ``key_file``, ``key_env`` are set."""
    return [k for k in (key, f"{key}_file", f"{key}_env") if getattr(model, k) is not None]


def _require_one_secret(model: BaseModel, key: str, *, prefix: str = "", alternative: str = "") -> None:
    """Exactly one way of giving secret ``key``, and it must be readable now."""
    given = _given(model, key)
    if len(given) != 1:
        raise ValueError(
            f"{prefix or 'set '}exactly one of {key}, {key}_file, {key}_env{alternative}"
            + (f" (got {', '.join(given)})" if given else "")
        )
    try:
        check_secret(getattr(model, key), getattr(model, f"{key}_file"), getattr(model, f"{key}_env"))
    except SecretError as exc:
        # Name the key: "cannot read /etc/..." alone does not say which of a mailbox's secrets it was.
        raise ValueError(f"{given[0]}: {exc}") from None


class MailboxConfig(_Model):
    name: str = Field(pattern=NAME_PATTERN, description="Unique among mailboxes and Twilio accounts, stable: it names the checkpoints.")
    host: str = Field(min_length=1, description="The IMAP server.")
    port: int | None = Field(default=None, ge=1, le=65535, description="Default 993 for `tls`, 143 otherwise.")
    security: Literal["tls", "starttls", "none"] = Field(default="tls", description="How the connection is protected: `tls`, `starttls` or `none`.")
    allow_plaintext: bool = Field(
        default=False, description="`security: none` is refused for any host but this machine (the login would travel in clear) unless this is `true`."
    )
    tls_verify: bool = Field(default=True, description="Certificates are verified (leave on).")
    ca_file: Path | None = Field(default=None, description="Extra CA bundle for a private certificate authority.")
    username: str = Field(min_length=1, description="The login; when it is an address it counts as the mailbox's own.")
    password: SecretStr | None = Field(
        default=None,
        description="The password; set exactly one of `password`, `password_file`, `password_env`, none of them with `auth.method: oauth2`.",
    )
    password_file: Path | None = Field(
        default=None,
        description=(
            "A file holding the password, re-read at each login. A relative name is looked up in `$CREDENTIALS_DIRECTORY` "
            "(systemd `LoadCredential=`, copied at start: a rotated file reaches the service with `systemctl restart`); "
            "run by hand, in the working directory, then `/etc/commsync/credentials`."
        ),
    )
    password_env: str | None = Field(default=None, description="An environment variable holding the password.")
    auth: MailboxAuth = Field(
        default_factory=MailboxAuth,
        description="How the mailbox logs in: `method: password` (the password keys above, the default) or `method: oauth2`.",
    )
    addresses: list[str] = Field(
        default_factory=list,
        description="The mailbox's own addresses and aliases (mail from them is `outbound`); the username counts when it is an address.",
    )
    folders: list[str] | None = Field(default=None, description="Folders to capture. Default: INBOX plus the folder marked `\\Sent`, found through SPECIAL-USE.")
    since: date | None = Field(default=None, description="How far back the first sync reaches (`2024-01-01`; default: everything).")
    batch_size: int = Field(default=500, ge=1, le=5000, description="Messages per fetch, store and checkpoint.")
    poll_interval: Duration | None = Field(default=None, description="Overrides `daemon.poll_interval` for this mailbox.")
    timeout: Duration = Field(default=timedelta(seconds=60), description="Network timeout of one IMAP command.")
    idle: bool | Literal["auto"] = Field(
        default="auto", description="Wait in IMAP IDLE on the first folder for new mail: `true`, `false`, or `auto` (when the server offers it)."
    )
    idle_renew: Duration = Field(default=timedelta(minutes=20), description="Re-issue IDLE this often; must be under `29m` (RFC 2177).")


    @field_validator("idle_renew")
    @classmethod
    def _idle_renew(cls, value: timedelta) -> timedelta:
        if not timedelta(0) < value < timedelta(minutes=29):
            raise ValueError("must be above 0 and under 29m (servers may end an IDLE after 30 minutes)")
        return value

    @field_validator("addresses")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value]

    @model_validator(mode="after")
    def _one_password(self) -> MailboxConfig:
        given = _given(self, "password")
        if self.auth.method == "oauth2":
            if given:
                raise ValueError(f"{', '.join(given)}: not used with auth.method oauth2 (remove it)")
        else:
            _require_one_secret(self, "password")
        if self.security == "none" and not self.allow_plaintext and not is_loopback(self.host):
            raise ValueError(
                f"security: none would send the login to {self.host} in clear; use tls or starttls "
                "(or set allow_plaintext: true if the network path is trusted)"
            )
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {self.ca_file} does not exist")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)

    @property
    def own_addresses(self) -> frozenset[str]:
        own = set(self.addresses)
        if "@" in self.username:
            own.add(self.username.lower())
        return frozenset(own)

    def read_password(self) -> str:
        """The password, read now (files are re-read so rotation works)."""
        return read_secret(self.password, self.password_file, self.password_env)


TWILIO_BASE_URL = "https://api.twilio.com"


class TwilioAccountConfig(_Model):
    """One Twilio account (or subaccount) whose calls and messages are captured."""

    name: str = Field(pattern=NAME_PATTERN, description="Unique among mailboxes and Twilio accounts; names the checkpoints, so keep it stable.")
    account_sid: str = Field(
        pattern=r"^AC[0-9a-fA-F]{32}$", description="`AC` followed by 32 hex digits: the account (or subaccount) whose lists are read."
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="The account's auth token, set in exactly one of `auth_token`, `auth_token_file`, `auth_token_env`; or an API key instead, not both.",
    )
    auth_token_file: Path | None = Field(
        default=None,
        description="A file holding the auth token, read again whenever a new connection is made; a relative name is looked up in `$CREDENTIALS_DIRECTORY`.",
    )
    auth_token_env: str | None = Field(default=None, description="An environment variable holding the auth token.")
    api_key_sid: str | None = Field(
        default=None,
        pattern=r"^SK[0-9a-fA-F]{32}$",
        description=(
            "An API key (`SK` + 32 hex digits) instead of the auth token, with one of `api_key_secret`, "
            "`api_key_secret_file`, `api_key_secret_env`. This is the recommended setup."
        ),
    )
    api_key_secret: SecretStr | None = Field(default=None, description="The API key's secret.")
    api_key_secret_file: Path | None = Field(
        default=None,
        description="A file holding the API key's secret, read again whenever a new connection is made (a rotated key is picked up); a relative name is looked up in `$CREDENTIALS_DIRECTORY`.",
    )
    api_key_secret_env: str | None = Field(default=None, description="An environment variable holding the API key's secret.")
    channels: list[Literal["calls", "messages"]] = Field(
        default_factory=lambda: ["calls", "messages"], min_length=1, description="Which lists to read."
    )
    since: date | None = Field(default=None, description="The date the first sync reaches back to (UTC day; default: everything).")
    lookback: Duration = Field(
        default=timedelta(hours=2), description=(
            "Items newer than the cursor minus this window are read again at every poll. This picks up a price that arrives late, "
            "a message that goes from `sent` to `delivered`, or a recording added after the call (0 to 31 days)."
        ),
    )
    base_url: str = Field(default=TWILIO_BASE_URL, description="Twilio's API root: point this at an API proxy. The tests point it at a local fake.")
    page_size: int = Field(default=500, ge=1, le=1000, description="Items per list page (Twilio allows at most 1000). Each page is stored and checkpointed as one batch.")
    numbers: list[str] = Field(
        default_factory=list,
        description=(
            "More numbers of your own, in international form: other company lines, or staff phones that calls are forwarded to. "
            "These numbers are never treated as customers. The account's own side of each call or message is recognised without this list."
        ),
    )
    poll_interval: Duration | None = Field(default=None, description="Overrides `daemon.poll_interval` for this account.")
    timeout: Duration = Field(default=timedelta(seconds=60), description="Network timeout of one API request.")


    @field_validator("channels")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("lookback")
    @classmethod
    def _lookback(cls, value: timedelta) -> timedelta:
        if value < timedelta(0) or value > timedelta(days=31):
            raise ValueError("lookback must be between 0 and 31 days")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", value):
            raise ValueError("base_url must be an http(s) URL such as https://api.twilio.com")
        host = re.sub(r":\d+$", "", value.split("://", 1)[1].split("/", 1)[0])
        if value.startswith("http://") and not is_loopback(host):
            # Basic auth carries the token or key secret in every request.
            raise ValueError("base_url must use https (plain http is allowed to this machine only)")
        return value.rstrip("/")

    @field_validator("numbers")
    @classmethod
    def _numbers(cls, value: list[str]) -> list[str]:
        out = []
        for raw in value:
            number = to_e164(raw)
            if number is None:
                raise ValueError(f"{raw!r} is not a phone number in international form (+country code ...)")
            out.append(number)
        return out

    @model_validator(mode="after")
    def _one_credential(self) -> TwilioAccountConfig:
        token, secret = _given(self, "auth_token"), _given(self, "api_key_secret")
        if self.api_key_sid is None:
            if secret:
                raise ValueError(f"{secret[0]} needs api_key_sid")
            _require_one_secret(self, "auth_token", alternative=" (or api_key_sid with one api_key_secret*)")
        else:
            if token:
                raise ValueError(f"use either the auth token or an API key, not both (got api_key_sid and {token[0]})")
            _require_one_secret(self, "api_key_secret", prefix="api_key_sid needs ")
        return self

    def read_credentials(self) -> tuple[str, str]:
        """(username, password) for Basic auth, read now (files are re-read so rotation works)."""
        if self.api_key_sid is not None:
            return self.api_key_sid, read_secret(self.api_key_secret, self.api_key_secret_file, self.api_key_secret_env)
        return self.account_sid, read_secret(self.auth_token, self.auth_token_file, self.auth_token_env)


class Settings(BaseSettings):
    """The whole configuration file. ``COMMSYNC_A__B`` environment variables override key a.b.

    This class holds the keys every configuration has; `settings_model` adds one
    list per registered source kind (``mailboxes``, ``twilio_accounts``, ...).
    """

    model_config = SettingsConfigDict(
        env_prefix="COMMSYNC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    mongodb: MongoSettings = Field(default=MongoSettings(), description="Where records, histories and checkpoints are stored.")
    customers: CustomersSettings = Field(
        default=CustomersSettings(), description="The CRM's customers collection, and what commsync may write to it."
    )
    internal_domains: list[str] = Field(
        default_factory=list, description="Staff domains: never customers; mail from them is `outbound`."
    )
    capture: CaptureSettings = Field(
        default=CaptureSettings(),
        description="What capture stores and how much of each message; `capture: matched` is shorthand for `capture: {policy: matched}`.",
    )
    daemon: DaemonSettings = Field(
        default=DaemonSettings(), description="The service (`commsync run`): passes, retries, parse workers, leases, the HTTP listener."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="The least severe log events written.")
    default_region: str | None = Field(
        default=None,
        description=(
            "ISO 3166 region (`US`, `GB`, `DE`, ...) for phone numbers written without a country code, such as a CRM's "
            "`(415) 555-0100`. Without it such numbers cannot be read and match nothing; numbers with a `+` or `00` prefix are always readable."
        ),
    )
    blocklist: list[str] = Field(
        default_factory=list, description="Addresses, `@domains` (with their subdomains) and phone numbers never captured."
    )
    capture_automated: bool = Field(
        default=False, description="Also capture automated mail: auto-replies, bounces, lists, newsletters (`Auto-Submitted`, `List-Id`, `Precedence: bulk`, `List-Unsubscribe`)."
    )
    retention: RetentionSettings = Field(default=RetentionSettings(), description="How long records are kept.")
    rematch: RematchSettings = Field(
        default=RematchSettings(), description="Re-linking records that matched no customer when they were captured."
    )

    @field_validator("capture", mode="before")
    @classmethod
    def _capture_shorthand(cls, value: Any) -> Any:
        # `capture: matched` (as a bare word) means `capture: {policy: matched}`.
        return {"policy": value} if isinstance(value, str) else value

    @field_validator("blocklist")
    @classmethod
    def _blocklist(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            entry = entry.strip().lower()
            local, at, domain = entry.rpartition("@")
            if at and "." in domain and " " not in entry or not at and sum(c.isdigit() for c in entry) >= 5 and re.fullmatch(r"[\d\s()+./-]+", entry):
                out.append(entry)
            else:
                raise ValueError(f"{entry!r} is neither an address, an @domain nor a phone number")
        return out

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().upper()
        if not region_is_known(value):
            raise ValueError(f"{value!r} is not a region code phonenumbers knows (use ISO 3166 alpha-2 such as US, GB, DE)")
        return value

    @field_validator("internal_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [v.strip().lower().lstrip("@") for v in value]

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for source in self.sources():
            if source.name in seen:
                raise ValueError(f"source name {source.name!r} is used twice; names key checkpoints and must be unique")
            seen.add(source.name)
        return self

    def sources(self) -> list[Any]:
        """Every configured source, kind by kind in registration order, each in file order."""
        from commsync.connectors.registry import kinds

        return [source for kind in kinds() for source in getattr(self, kind.settings_key, ())]

    def sources_of(self, kind: str) -> list[Any]:
        """The configured sources of one kind (``imap``, ``twilio``, ...)."""
        from commsync.connectors.registry import kinds

        return [source for k in kinds() if k.name == kind for source in getattr(self, k.settings_key, ())]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)


_MODEL: type[Settings] | None = None


def settings_model() -> type[Settings]:
    """Settings with one list per registered source kind, built once per set of kinds."""
    global _MODEL
    if _MODEL is None:
        from pydantic import create_model

        from commsync.connectors import registry

        fields: dict[str, Any] = {
            kind.settings_key: (list[kind.model], Field(default_factory=list, description=kind.description or None))  # type: ignore[name-defined]
            for kind in registry.kinds()
        }
        _MODEL = create_model("Settings", __base__=Settings, __module__=__name__, **fields)
        registry.on_change(_forget_model)
    return _MODEL


def _forget_model() -> None:
    global _MODEL
    _MODEL = None
