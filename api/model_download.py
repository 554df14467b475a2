"""Model retrieval: fetch a model that is not in MODEL_PATH from the model catalog, safely.

Off unless ALLOW_DOWNLOAD=true. The catalog (MODEL_CATALOG_URL, GPT4All's models3.json format: a
JSON list of entries with `filename`, `url`, `filesize`, `md5sum`) says where a model lives and what
it must look like. A download:

- streams to `.<name>.part` in the target folder, with DOWNLOAD_TIMEOUT on connecting and on every
  read, and logs its progress;
- is checked against the catalog's size and checksum (md5sum, or sha256sum when given) and must be a
  GGUF file; only then is it renamed into place (atomic), so a model name never points at a partial
  or wrong file; on any failure the part file is removed;
- is shared: a second request for the same model in this process waits for the first download
  instead of starting another; a worker process that finds another process's part file growing
  waits for it too, and takes over a part file that stopped growing (its owner died).

Names are bare .gguf file names (api.model_names) and folders are MODEL_PATH or a folder inside it
(`resolve_folder`): a client never chooses where a file lands outside MODEL_PATH.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from api.config import Settings
from api.errors import (
    DownloadDisabled,
    DownloadFailed,
    DownloadTimeout,
    Forbidden,
    InsufficientStorage,
    InvalidRequest,
    ModelNotFound,
    NotFound,
)
from api.model_names import ModelNameError, file_name_for

log = logging.getLogger("api.model_download")

DEFAULT_DOWNLOAD_BASE = "https://gpt4all.io/models/gguf/"
"""Where gpt4all's own bindings fetch a catalog entry that has no `url`."""
CATALOG_TTL_SECONDS = 300.0
CHUNK_BYTES = 1 << 20
PROGRESS_EVERY_SECONDS = 5.0
FREE_SPACE_MARGIN_BYTES = 64 << 20
USER_AGENT = "gpt4all-api-daemon"
GGUF_MAGIC = b"GGUF"


DISABLED_MESSAGE = "downloading models is disabled on this server (ALLOW_DOWNLOAD=false)"


# -- names and folders


def model_file_name(requested: str, param: str = "model") -> str:
    """A requested model as a bare .gguf file name, or a 400 naming `param`."""
    try:
        return file_name_for(requested)
    except ModelNameError as error:
        raise InvalidRequest(f"'{param}' must be {error}", param=param) from None


def resolve_folder(model_path: Path, requested: str | None, param: str = "model_path") -> Path:
    """MODEL_PATH itself or an existing folder inside it. Anything that leads out (.., absolute paths
    elsewhere, symlinks) is a 403, a folder that does not exist a 404: whether a path is either
    depends on the server's files, which the request's schema cannot know, so neither is a 400."""
    base = model_path.resolve()
    if requested is None or requested.strip() in ("", "."):
        return base
    candidate = Path(requested.strip())
    if not candidate.is_absolute():
        candidate = base / candidate
    resolved = candidate.resolve()
    if resolved != base and base not in resolved.parents:
        raise Forbidden(f"'{param}' must be MODEL_PATH or a folder inside it", param=param, code="outside_model_path")
    if not resolved.is_dir():
        raise NotFound(f"'{param}' names no existing folder inside MODEL_PATH", param=param)
    return resolved


# -- the catalog


@dataclass(frozen=True)
class CatalogEntry:
    filename: str
    url: str
    filesize: int | None
    md5sum: str | None
    sha256sum: str | None

    @classmethod
    def parse(cls, raw: Any) -> CatalogEntry | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("filename"), str):
            return None
        try:
            filename = file_name_for(raw["filename"]) if raw["filename"].lower().endswith(".gguf") else None
        except ModelNameError:
            filename = None
        if filename is None:
            return None
        url = raw.get("url") if isinstance(raw.get("url"), str) and raw.get("url") else DEFAULT_DOWNLOAD_BASE + filename
        size = raw.get("filesize")
        try:
            filesize = int(size) if size is not None and not isinstance(size, bool) else None
        except (TypeError, ValueError):
            filesize = None
        md5 = raw.get("md5sum") if isinstance(raw.get("md5sum"), str) and len(raw["md5sum"]) == 32 else None
        sha256 = raw.get("sha256sum") if isinstance(raw.get("sha256sum"), str) and len(raw["sha256sum"]) == 64 else None
        return cls(filename, url, filesize, md5.lower() if md5 else None, sha256.lower() if sha256 else None)


def _host(url: str) -> str:
    return urlsplit(url).netloc or url


def _timeout_or_failure(what: str, error: Exception) -> DownloadFailed:
    import requests

    text = str(error).lower()
    if isinstance(error, requests.Timeout) or "timed out" in text:
        return DownloadTimeout(f"{what}: no data for DOWNLOAD_TIMEOUT seconds; gave up")
    if isinstance(error, requests.exceptions.ChunkedEncodingError) or "incompleteread" in text or "incomplete" in text:
        return DownloadFailed(f"{what}: the transfer was cut short")
    if isinstance(error, requests.ConnectionError):
        return DownloadFailed(f"{what}: could not connect or the connection broke")
    return DownloadFailed(f"{what}: {type(error).__name__}")


# -- the downloader


@dataclass(frozen=True)
class Retrieval:
    path: Path
    downloaded: bool

    @property
    def message(self) -> str:
        if self.downloaded:
            return f"Model {self.path.name} downloaded successfully."
        return f"Model {self.path.name} is installed."


class ModelDownloader:
    """One per worker process; thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.model_path = settings.model_path
        self.allowed = settings.allow_download
        self.catalog_url = settings.model_catalog_url
        self.timeout = settings.download_timeout
        self._lock = threading.Lock()
        self._jobs: dict[Path, Future[Path]] = {}
        self._catalog: tuple[float, dict[str, CatalogEntry]] | None = None
        if self.allowed:
            self.remove_stale_parts()

    def remove_stale_parts(self) -> list[Path]:
        """Remove part files that stopped growing (their download died with its process)."""
        removed = []
        for folder in (self.model_path, *(path for path in self.model_path.glob("*") if path.is_dir())):
            for part in folder.glob(".*.gguf.part"):
                with contextlib.suppress(OSError):
                    if time.time() - part.stat().st_mtime > self._stale_after():
                        part.unlink()
                        removed.append(part)
                        log.info("removed %s, left by a download that died", part.name)
        return removed

    # -- catalog

    def catalog(self) -> dict[str, CatalogEntry]:
        """The catalog's .gguf entries by file name (fetched at most every CATALOG_TTL_SECONDS)."""
        with self._lock:
            cached = self._catalog
        if cached is not None and time.monotonic() - cached[0] < CATALOG_TTL_SECONDS:
            return cached[1]
        entries: dict[str, CatalogEntry] = {}
        for raw in self._fetch_catalog():
            entry = CatalogEntry.parse(raw)
            if entry is not None:
                entries.setdefault(entry.filename, entry)
        with self._lock:
            self._catalog = (time.monotonic(), entries)
        return entries

    def _fetch_catalog(self) -> list[Any]:
        import requests  # here, not at the top: a worker that never downloads does not pay for it

        source = self.catalog_url
        what = f"the model catalog at {_host(source)}"
        try:
            if source.startswith(("http://", "https://")):
                with requests.get(source, timeout=self.timeout, headers={"User-Agent": USER_AGENT}) as response:
                    if response.status_code != 200:
                        raise DownloadFailed(f"{what} answered HTTP {response.status_code}", code="catalog_unavailable")
                    data = response.json()
            else:
                path = Path(source[len("file://"):] if source.startswith("file://") else source)
                data = json.loads(path.read_text(encoding="utf-8"))
        except DownloadFailed:
            raise
        except (requests.RequestException, OSError) as error:
            failure = _timeout_or_failure(what, error)
            failure.code = "catalog_unavailable" if failure.status == 502 else failure.code
            raise failure from None
        except ValueError:
            raise DownloadFailed(f"{what} is not valid JSON", code="catalog_unavailable") from None
        if not isinstance(data, list):
            raise DownloadFailed(f"{what} is not a JSON list of models", code="catalog_unavailable")
        return data

    # -- retrieval

    def retrieve(self, name: str, folder: Path | None = None) -> Retrieval:
        """Make sure model file `name` is in `folder` (default MODEL_PATH), downloading it if allowed."""
        folder = folder or self.model_path
        target = folder / name
        if target.is_file():
            return Retrieval(target, downloaded=False)
        if not self.allowed:
            raise DownloadDisabled(f"the model '{name}' is not installed and {DISABLED_MESSAGE}")
        entry = self.catalog().get(name)
        if entry is None:
            raise ModelNotFound(f"the model '{name}' is neither installed nor in the model catalog", param="model")
        with self._lock:
            job = self._jobs.get(target)
            owner = job is None
            if job is None:
                job = self._jobs[target] = Future()
        if not owner:
            log.info("%s: waiting for the download already under way", name)
            return Retrieval(job.result(), downloaded=True)
        try:
            self._download(entry, target)
            job.set_result(target)
        except BaseException as error:
            job.set_exception(error)
            raise
        finally:
            with self._lock:
                self._jobs.pop(target, None)
        return Retrieval(target, downloaded=True)

    def _download(self, entry: CatalogEntry, target: Path) -> None:
        part = target.parent / f".{target.name}.part"
        while True:
            try:
                handle = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
                break
            except FileExistsError:
                if self._wait_for_other_process(part, target):
                    return
        try:
            with os.fdopen(handle, "wb") as out:
                self._stream(entry, out)
                out.flush()
                os.fsync(out.fileno())
            self._verify(entry, part)
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise

    def _stale_after(self) -> float:
        return 2 * self.timeout + 5

    def _wait_for_other_process(self, part: Path, target: Path) -> bool:
        """Another process is downloading this model: True once it succeeded, False when it stopped
        (failed, or its part file stopped growing and was removed) so this process should try."""
        log.info("%s: another process is downloading it; waiting", target.name)
        while True:
            try:
                age = time.time() - part.stat().st_mtime
            except FileNotFoundError:
                return target.is_file()
            if age > self._stale_after():
                log.warning("%s: the other download stopped %.0f s ago; taking over", target.name, age)
                with contextlib.suppress(OSError):
                    part.unlink()
                return False
            time.sleep(0.2)

    def _stream(self, entry: CatalogEntry, out: Any) -> None:
        import requests

        what = f"download of {entry.filename} from {_host(entry.url)}"
        expected = entry.filesize
        if expected is not None:
            free = shutil.disk_usage(self.model_path if self.model_path.exists() else Path.cwd()).free
            if free < expected + FREE_SPACE_MARGIN_BYTES:
                raise InsufficientStorage(f"not enough free disk space for {entry.filename} ({expected} bytes)")
        log.info("downloading %s from %s (%s bytes)", entry.filename, _host(entry.url), expected or "unknown")
        md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
        started = last_report = time.monotonic()
        received = 0
        try:
            with requests.get(entry.url, stream=True, timeout=self.timeout,
                              headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}) as response:
                if response.status_code != 200:
                    raise DownloadFailed(f"{what}: the server answered HTTP {response.status_code}")
                for chunk in response.iter_content(CHUNK_BYTES):
                    received += len(chunk)
                    if expected is not None and received > expected:
                        raise DownloadFailed(f"{what}: the server sent more than the catalog's {expected} bytes")
                    out.write(chunk)
                    md5.update(chunk)
                    if entry.sha256sum:
                        sha256.update(chunk)
                    now = time.monotonic()
                    if now - last_report >= PROGRESS_EVERY_SECONDS:
                        last_report = now
                        share = f"{100 * received / expected:.0f}% " if expected else ""
                        log.info("downloading %s: %s%d bytes, %.1f MB/s", entry.filename, share, received,
                                 received / max(now - started, 1e-6) / 1e6)
        except DownloadFailed:
            raise
        except (requests.RequestException, OSError) as error:
            raise _timeout_or_failure(f"{what} (after {received} bytes)", error) from None
        if expected is not None and received != expected:
            raise DownloadFailed(f"{what}: got {received} of {expected} bytes (the transfer was cut short)")
        if entry.md5sum and md5.hexdigest() != entry.md5sum:
            raise DownloadFailed(f"{what}: the md5 checksum does not match the catalog's")
        if entry.sha256sum and sha256.hexdigest() != entry.sha256sum:
            raise DownloadFailed(f"{what}: the sha256 checksum does not match the catalog's")
        log.info("downloaded %s: %d bytes in %.1f s, checksum verified", entry.filename, received, time.monotonic() - started)

    @staticmethod
    def _verify(entry: CatalogEntry, part: Path) -> None:
        with part.open("rb") as file:
            if file.read(4) != GGUF_MAGIC:
                raise DownloadFailed(f"download of {entry.filename}: the file is not a GGUF model")
