"""What the module remembers between sessions: server addresses, each server's permission and token, the last
model, dose, strength, sampling steps and self-ensemble, and the time limits.

Everything is kept in a store with QSettings' ``value(key)`` / ``setValue(key, value)`` / ``sync()``: Slicer's
settings in the module (``qt.QSettings()``), a ``MemorySettings`` in tests, so none of this needs Slicer.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .client import Timeouts, normalise_token, server_key
from .ensemble import DEFAULT_ENSEMBLE, check_ensemble
from .steps import check_steps
from .strength import DEFAULT_STRENGTH

GROUP = "LowDoseDenoise"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
MAX_URL_HISTORY = 10
TIMEOUT_KEYS = (
    ("connect", "ConnectTimeoutSeconds"),
    ("response", "ResponseTimeoutSeconds"),
    ("idle", "IdleTimeoutSeconds"),
)


class ConsentStore:
    """Which servers the user has allowed to receive volumes, remembered between sessions.

    The store keeps one JSON text through ``load()`` / ``save(text)``; ``JsonConsentStore`` puts it in a file,
    ``ModuleSettings.consent()`` in Slicer's settings. A text that cannot be read counts as "nothing allowed",
    never as consent.
    """

    def __init__(self, load: Callable[[], str | None], save: Callable[[str], None]):
        self._load = load
        self._save = save
        self._lock = threading.Lock()

    def _servers(self) -> dict[str, dict]:
        try:
            data = json.loads(self._load() or "{}")
        except (ValueError, OSError):
            return {}
        servers = data.get("servers") if isinstance(data, dict) else None
        return {k: v for k, v in servers.items() if isinstance(v, dict)} if isinstance(servers, dict) else {}

    def is_allowed(self, url: str) -> bool:
        entry = self._servers().get(server_key(url))
        return bool(entry and entry.get("allowed") is True)

    def allow(self, url: str) -> None:
        self._set(url, True)

    def revoke(self, url: str) -> None:
        self._set(url, False)

    def allowed_servers(self) -> list[str]:
        return sorted(k for k, v in self._servers().items() if v.get("allowed") is True)

    def _set(self, url: str, allowed: bool) -> None:
        with self._lock:
            servers = self._servers()
            servers[server_key(url)] = {
                "allowed": allowed,
                "changed": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime()),
            }
            self._save(json.dumps({"version": 1, "servers": servers}, indent=2, sort_keys=True))


class JsonConsentStore(ConsentStore):
    """A ConsentStore in a small JSON file (written atomically)."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(self._read, self._write)

    def _read(self) -> str | None:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".consent-", dir=str(self.path.parent))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


class TokenStore:
    """The access token of each server (by ``scheme://host:port``), remembered between sessions.

    Like ``ConsentStore`` it keeps one JSON text through ``load()`` / ``save(text)`` (the Slicer module: in
    Slicer's settings). A token is kept for its own server only, so it is never handed to another one.
    """

    def __init__(self, load: Callable[[], str | None], save: Callable[[str], None]):
        self._load = load
        self._save = save
        self._lock = threading.Lock()

    def _tokens(self) -> dict[str, str]:
        try:
            data = json.loads(self._load() or "{}")
        except (ValueError, OSError):
            return {}
        tokens = data.get("tokens") if isinstance(data, dict) else None
        return {k: v for k, v in tokens.items() if isinstance(v, str)} if isinstance(tokens, dict) else {}

    def get(self, url: str) -> str:
        """The token saved for this server, "" when none."""
        return self._tokens().get(server_key(url), "")

    def set(self, url: str, token: str | None) -> None:
        """Remember ``token`` for this server; an empty one forgets it."""
        token = normalise_token(token)
        with self._lock:
            tokens = self._tokens()
            if token:
                tokens[server_key(url)] = token
            else:
                tokens.pop(server_key(url), None)
            self._save(json.dumps({"version": 1, "tokens": tokens}, indent=2, sort_keys=True))


class MemorySettings:
    """QSettings' ``value`` / ``setValue`` / ``sync`` over a dict: settings that last as long as the object
    (tests, and the self-test, which must not change the user's settings)."""

    def __init__(self, values: dict | None = None):
        self.values = dict(values or {})

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:  # QSettings' name
        self.values[key] = value

    def sync(self) -> None:
        pass


class ModuleSettings:
    """The module's entries (``LowDoseDenoise/<key>``) in a QSettings-like ``store``."""

    def __init__(self, store):
        self.store = store

    def get(self, key: str, default=None):
        """The value saved under ``key``; ``default`` when there is none or it is empty."""
        value = self.store.value(f"{GROUP}/{key}")
        return default if value is None or value == "" else value

    def set(self, key: str, value) -> None:
        self.store.setValue(f"{GROUP}/{key}", value)
        self.store.sync()

    # -- servers

    def server_urls(self) -> list[str]:
        """The addresses used before, most recent first (the default address when there are none)."""
        return [u for u in str(self.get("ServerUrlHistory", "")).split("\n") if u] or [DEFAULT_SERVER_URL]

    def server_url(self) -> str:
        """The address to show at start: the last one connected to."""
        return str(self.get("ServerUrl", self.server_urls()[0]))

    def remember_server_url(self, url: str) -> list[str]:
        """Record ``url`` as the last server, first in the history (at most MAX_URL_HISTORY); the new history."""
        urls = ([url] + [u for u in self.server_urls() if u != url])[:MAX_URL_HISTORY]
        self.set("ServerUrl", url)
        self.set("ServerUrlHistory", "\n".join(urls))
        return urls

    def consent(self) -> ConsentStore:
        """The per-server permission to send volumes, kept under ``UploadConsent``."""
        return ConsentStore(lambda: self.get("UploadConsent"), lambda text: self.set("UploadConsent", text))

    def tokens(self) -> TokenStore:
        """Each server's access token, kept under ``ServerTokens`` (plain text, like the addresses)."""
        return TokenStore(lambda: self.get("ServerTokens"), lambda text: self.set("ServerTokens", text))

    # -- choices and limits

    def model_task(self) -> str:
        return str(self.get("ModelTask", ""))

    def set_model_task(self, task: str) -> None:
        self.set("ModelTask", task)

    def dose(self) -> str:
        """The last dose chosen for a dose-aware model, as the user gave it ("auto", "1/4", "0.3")."""
        return str(self.get("Dose", "auto"))

    def set_dose(self, dose: str) -> None:
        self.set("Dose", dose)

    def strength(self) -> str:
        """The last denoising strength chosen ("low", "medium", "high"); "medium" at first."""
        return str(self.get("Strength", DEFAULT_STRENGTH))

    def set_strength(self, strength: str) -> None:
        self.set("Strength", strength)

    def steps(self) -> int | None:
        """The last sampling steps chosen for a diffusion model; None (at first, after choosing a model's
        default, or when unreadable): each model's own."""
        try:
            return check_steps(int(str(self.get("SamplingSteps", "")).strip()))
        except ValueError:
            return None

    def set_steps(self, steps: int | None) -> None:
        """Remember ``steps`` (None: each model's own)."""
        self.set("SamplingSteps", "" if steps is None else str(check_steps(steps)))

    def ensemble(self) -> int:
        """The last self-ensemble chosen (1, 2, 4 or 8); 1 (off) at first or when unreadable."""
        try:
            return check_ensemble(int(str(self.get("SelfEnsemble", DEFAULT_ENSEMBLE)).strip()))
        except ValueError:
            return DEFAULT_ENSEMBLE

    def set_ensemble(self, ensemble: int) -> None:
        """Remember ``ensemble`` (1, 2, 4 or 8; ValueError else)."""
        self.set("SelfEnsemble", str(check_ensemble(ensemble)))

    def timeouts(self) -> Timeouts:
        """Time limits from ``{Connect,Response,Idle}TimeoutSeconds``; the default for any missing or unreadable."""
        default, values = Timeouts(), {}
        for field, key in TIMEOUT_KEYS:
            try:
                values[field] = float(self.get(key, getattr(default, field)))
            except (TypeError, ValueError):
                values[field] = getattr(default, field)
        return Timeouts(**values)
