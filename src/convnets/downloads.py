"""Downloads kept in the user cache folder: retried on transient errors, verified once, never repeated.

http(s) and file: URLs are read with urllib, an http(s) server's credentials taken from
~/.netrc (or the file $NETRC names); any other scheme (s3://, gs://, ...) with the fsspec
filesystem installed for it, which reads its credentials from the environment as DVC's
remotes do. A scheme with no filesystem installed is refused, naming the extra to install.

A finished download is checked (its SHA-256 when one is expected, and the CRC
of every member of a zip) and then gets a `<name>.verified` note with its size
and SHA-256. Later runs reuse a file whose note still matches, without any
network access; anything else is downloaded again. URLs are logged without
their query string or user info, where signed URLs and passwords live.

Runs on one machine share the cache (two workers, one user): a download holds
`<name>.lock` (flock), so a second run of the same file waits, then finds it
verified; it is written in a folder of its own beside the cache's files and
renamed into place only once verified, so no run ever reads a file still being
written, and no run's download truncates another's.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import math
import netrc
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

try:
    import fcntl
except ImportError:  # Windows: no flock; the private folders and the rename still keep files whole
    fcntl = None

from convnets.errors import DataError
from convnets.outputs import file_digest
from convnets.progress import progress

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 1 << 20
TIMEOUT_S = 60
# HTTP statuses worth another try, with every 5xx: a timeout, "too early", "too many requests".
TRANSIENT_STATUS = {408, 425, 429}
# Errors below HTTP worth another try: timeouts, refused or reset connections, a transfer cut short.
TRANSIENT_ERRORS = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException)
# The one message of a transient error that outlasted every try (transient_failure), for URLs and
# Kaggle alike; the flow retries a stage that prints it (pipeline.dvc imports this pattern).
TRANSIENT_FAILURE = re.compile(r"could not download .+ after \d+ tr(?:y|ies)\b")
URLLIB_SCHEMES = {"http", "https", "file"}
# The extra of pyproject.toml that installs each package fsspec names for a scheme (s3:// -> s3fs).
FILESYSTEM_EXTRAS = {"s3fs": "s3", "gcsfs": "gs"}
# What urllib reports (as URLError reasons) for a file:// URL it cannot read: no retry helps.
LOCAL_FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


class IncompleteDownload(Exception):
    """The transfer ended early or the file is damaged; worth another try."""


class WrongChecksum(Exception):
    """A complete file whose SHA-256 is not the expected one: another copy would be the same file."""


class RetriesSpent(Exception):
    """A transient error outlasted every try: `error` is the last one's, `tries` how many there were."""

    def __init__(self, error: Exception, tries: int):
        super().__init__(f"{describe(error)} after {tries} tries")
        self.error, self.tries = error, tries


def is_transient(exc: BaseException) -> bool:
    """The one rule for every fetch (URLs, object stores, Kaggle): may another try succeed?

    Yes for HTTP 408, 425, 429 and 5xx, timeouts, refused or reset connections and transfers cut
    short; no for any other status (401, 403, 404, ...), a missing or unreadable file, and the rest.
    """
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_STATUS or status >= 500
    if isinstance(exc, urllib.error.URLError):
        # Refused or reset connections and timeouts pass; a missing or unreadable local file does not.
        return not isinstance(exc.reason, LOCAL_FILE_ERRORS)
    return isinstance(exc, (IncompleteDownload, *TRANSIENT_ERRORS, *client_network_errors()))


def client_network_errors() -> tuple[type[BaseException], ...]:
    """The network errors of requests and urllib3 (the Kaggle client's), where they are loaded.

    Looked up, not imported: an error of a library this process never loaded cannot have been raised.
    """
    errors: list[type[BaseException]] = []
    requests = sys.modules.get("requests")
    if requests is not None:
        errors += [requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError]
    urllib3 = sys.modules.get("urllib3.exceptions")
    if urllib3 is not None:
        errors += [urllib3.ProtocolError, urllib3.ReadTimeoutError]
    return tuple(errors)


def transient_failure(subject: str, tries: int, reason: object) -> str:
    """The message of a transient error that outlasted `tries` tries: the flow retries the stage on it."""
    return f"could not download {subject} after {tries} {'try' if tries == 1 else 'tries'}: {reason}"


def with_retries(
    action: Callable[[], T],
    what: str,
    retries: int,
    backoff_s: float,
    is_transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `action`; on a transient error wait backoff_s, 2 x backoff_s, ... and try again.

    A permanent error is raised as it is, at once; a transient one that outlasts retries + 1
    tries as RetriesSpent, for the caller to report with transient_failure.
    """
    for attempt in range(retries + 1):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise RetriesSpent(exc, attempt + 1) from exc
            delay = backoff_s * 2**attempt
            log.warning("%s: %s; retry %d of %d in %.0f s", what, describe(exc), attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def describe(exc: BaseException) -> str:
    """A short description with no URL, header or credential in it."""
    status = http_status(exc)
    return f"HTTP {status}" if status else type(exc).__name__


def http_status(exc: BaseException) -> int | None:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code
    response = getattr(exc, "response", None)  # requests.HTTPError
    if response is not None and getattr(response, "status_code", None):
        return int(response.status_code)
    status = getattr(exc, "status", None)  # kaggle<1.7's ApiException
    return int(status) if isinstance(status, int) else None


def redact(url: str) -> str:
    """The URL without user info, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def is_url(location: str) -> bool:
    """http(s)://, file: and any scheme://; not a local path, C:\\ included (a one-letter scheme)."""
    scheme = urllib.parse.urlsplit(location).scheme
    return scheme == "file" or (len(scheme) > 1 and "://" in location)


def filesystem_problem(url: str) -> str | None:
    """One line when no installed filesystem reads `url`'s scheme, naming what to install; None when one does."""
    protocol = urllib.parse.urlsplit(url).scheme
    if protocol in URLLIB_SCHEMES:
        return None
    import fsspec

    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        return f"no filesystem reads {protocol}:// URLs (fsspec knows none by that name)"
    except ImportError:
        package = filesystem_package(protocol)
        extra = filesystem_extra(protocol)
        install = f'the project with the `{extra}` extra (make install EXTRAS="--extra {extra}")' if extra else package
        return f"{protocol}:// needs {package}: install {install}"
    return None


def filesystem_package(protocol: str) -> str | None:
    """The package of the fsspec filesystem for `protocol` (s3 -> s3fs), installed or not; None if fsspec knows none."""
    from fsspec.registry import known_implementations

    known = known_implementations.get(protocol)
    return known["class"].split(".")[0] if known else None


def filesystem_extra(protocol: str) -> str | None:
    """The extra of pyproject.toml that installs `protocol`'s filesystem (s3 -> s3), if the project has one."""
    return FILESYSTEM_EXTRAS.get(filesystem_package(protocol) or "")


# --- verified files ---------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    return file_digest(path, "sha256").hexdigest()


def note_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, expected_sha256: str = "") -> bool:
    """True when `path` is the complete file a previous run verified (and matches the expected hash)."""
    note = note_path(path)
    if not (path.is_file() and note.is_file()):
        return False
    try:
        recorded = json.loads(note.read_text())
        if recorded["size"] != path.stat().st_size:
            return False
        actual = sha256_of(path)
    except (ValueError, KeyError, TypeError, OSError):
        return False
    return actual == recorded["sha256"] and (not expected_sha256 or actual == expected_sha256.lower())


def verify_download(path: Path, expected_sha256: str = "") -> None:
    """Check a fresh download, then note it as verified.

    WrongChecksum for another file than the expected one; IncompleteDownload for a damaged zip.
    """
    actual = sha256_of(path)
    if expected_sha256 and actual != expected_sha256.lower():
        raise WrongChecksum(f"SHA-256 {actual} differs from the expected {expected_sha256}")
    if path.suffix == ".zip":
        check_zip(path)
    note_path(path).write_text(json.dumps({"size": path.stat().st_size, "sha256": actual}) + "\n")


def check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise IncompleteDownload(f"not a complete zip archive ({exc})") from None
    if bad is not None:
        raise IncompleteDownload(f"member {bad} is damaged")


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)
    note_path(path).unlink(missing_ok=True)


def prepare_downloads_dir(downloads_dir: Path) -> Path:
    downloads_dir.mkdir(parents=True, exist_ok=True)
    return downloads_dir


# --- one download of a file at a time, renamed into place whole ----------------------------


def reuse(target: Path, expected_sha256: str = "") -> bool:
    """True (and logged) when the cache holds `target`, verified."""
    if not is_verified(target, expected_sha256):
        return False
    log.info("using %s, verified when it was downloaded", target)
    return True


@contextlib.contextmanager
def only_download(target: Path) -> Iterator[None]:
    """Hold `<name>.lock` beside `target`: another run that wants the file waits, then reuses it.

    The lock file stays: removing it while another run waits on it would let a third lock a new one.
    """
    with open(target.with_name(f"{target.name}.lock"), "a+") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


@contextlib.contextmanager
def private_folder(target: Path) -> Iterator[Path]:
    """A temporary folder of this process beside `target` (same file system: renames are atomic)."""
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_leftovers(target: Path) -> None:
    """Private folders of runs that were killed while downloading `target`: none is in use under its lock."""
    for folder in target.parent.glob(f".{target.name}.*.partial"):
        shutil.rmtree(folder, ignore_errors=True)


def publish(download: Path, target: Path) -> None:
    """Rename a verified download, then its note, into the cache: a reader sees all of it or none."""
    # Not outputs.atomic_file: the temporary file is the download, verified before any rename,
    # and its note must follow it (a reader trusts the file only once the note is there).
    download.replace(target)
    note_path(download).replace(note_path(target))


# --- URLs -----------------------------------------------------------------------------


def download_url(
    url: str, downloads_dir: Path, retries: int, backoff_s: float, sha256: str = "", what: str = ""
) -> Path:
    """Download `url` into downloads_dir (once per machine) and return the local file.

    `what` names the download in errors ("could not download MNIST from <url>: ...").
    """
    subject = f"{what} from {redact(url)}" if what else redact(url)
    problem = filesystem_problem(url)
    if problem:
        raise DataError(f"cannot download {subject}: {problem}")
    name = Path(urllib.parse.urlsplit(url).path).name or "download.zip"
    target = prepare_downloads_dir(downloads_dir) / name
    if reuse(target, sha256):
        return target
    with only_download(target):
        if reuse(target, sha256):  # another run downloaded it while this one waited
            return target
        forget(target)
        remove_leftovers(target)
        with private_folder(target) as folder:
            download_verified(url, folder / name, retries, backoff_s, sha256, subject)
            publish(folder / name, target)
    return target


def download_verified(url: str, download: Path, retries: int, backoff_s: float, sha256: str, subject: str) -> None:
    """Download `url` to `download` and verify it, retrying transient failures; DataError if it cannot."""

    def attempt() -> None:
        try:
            fetch_to(url, download)
            verify_download(download, sha256)
        except BaseException:
            forget(download)  # no resume for plain URLs: the next try starts afresh
            raise

    # A local file reads the same on every try: none of its failures is worth another.
    worth_retrying = is_transient if urllib.parse.urlsplit(url).scheme != "file" else lambda exc: False
    try:
        with_retries(attempt, f"downloading {redact(url)}", retries, backoff_s, worth_retrying)
    except RetriesSpent as spent:
        raise DataError(transient_failure(subject, spent.tries, url_failure_reason(spent.error))) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, IncompleteDownload, WrongChecksum) as exc:
        raise DataError(download_failure(subject, exc)) from None


def download_failure(subject: str, exc: BaseException) -> str:
    """What went wrong, for an error no retry helps: it never says "after N tries" (pipeline.dvc)."""
    reason = getattr(exc, "reason", None) or exc
    if isinstance(reason, FileNotFoundError):  # urllib's for file:, fsspec's own for an object store
        return f"could not download {subject}: the file does not exist"
    return f"could not download {subject}: {url_failure_reason(exc)}"


def url_failure_reason(exc: BaseException) -> object:
    """ "HTTP 404 Not Found" for a status, else urllib's reason or the error itself."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    return getattr(exc, "reason", None) or exc


def fetch_to(url: str, path: Path) -> None:
    """One try: `url` copied to `path`, by urllib or by the fsspec filesystem of its scheme."""
    if urllib.parse.urlsplit(url).scheme in URLLIB_SCHEMES:
        fetch_with_urllib(url, path)
    else:
        fetch_with_fsspec(url, path)


def fetch_with_urllib(url: str, path: Path) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "convnets-fetch"})
    authorization = netrc_authorization(url)
    if authorization:  # unredirected: a redirect to another host (a signed storage URL) does not get it
        request.add_unredirected_header("Authorization", authorization)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(path, "wb") as out:
        length = response.headers.get("Content-Length")
        copy_chunks(response, out, path.name, int(length) if length and length.isdigit() else None)


def fetch_with_fsspec(url: str, path: Path) -> None:
    """An object (s3://, gs://, memory://, ...) through its filesystem, which finds its own credentials."""
    from fsspec.core import url_to_fs

    filesystem, remote = url_to_fs(url)
    expected = filesystem.size(remote)
    with filesystem.open(remote, "rb") as source, open(path, "wb") as out:
        copy_chunks(source, out, path.name, expected)


def copy_chunks(source, out, name: str, expected: int | None) -> None:
    """Copy `source` to `out` with a progress bar; IncompleteDownload if it ends before `expected` bytes."""
    chunks = iter(lambda: source.read(CHUNK), b"")
    total = math.ceil(expected / CHUNK) if expected else None
    written = 0
    for chunk in progress(chunks, f"fetch: downloading {name}", total, unit="MiB"):
        out.write(chunk)
        written += len(chunk)
    if expected is not None and written != expected:
        raise IncompleteDownload(f"got {written:,} of {expected:,} bytes")


def netrc_authorization(url: str) -> str | None:
    """Basic auth for an http(s) URL's host from ~/.netrc (or the file $NETRC names), as curl and requests read it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(parts.hostname)
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as exc:  # its message may quote the file's tokens: only where it is
        log.warning("not reading %s, line %s: downloading without its credentials", exc.filename, exc.lineno)
        return None
    except OSError as exc:
        log.warning("not reading the netrc file (%s): downloading without its credentials", type(exc).__name__)
        return None
    if entry is None:
        return None
    login, _, password = entry
    return "Basic " + base64.b64encode(f"{login}:{password or ''}".encode()).decode()
