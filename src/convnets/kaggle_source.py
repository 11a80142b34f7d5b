"""Download a Kaggle competition's files with the official `kaggle` client.

The client is imported only here, and only when `fetch.source` is kaggle:
importing it authenticates (and, in some versions, fails without
credentials), so other sources must never pay for it. Credentials are
whatever the installed client accepts: KAGGLE_USERNAME / KAGGLE_KEY,
~/.kaggle/kaggle.json (or $KAGGLE_CONFIG_DIR/kaggle.json), KAGGLE_API_TOKEN or
~/.kaggle/access_token, or `kaggle auth login`. None of them is ever logged:
errors are reported by HTTP status and exception type only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
from pathlib import Path

from convnets.downloads import (
    IncompleteDownload,
    RetriesSpent,
    describe,
    forget,
    http_status,
    only_download,
    prepare_downloads_dir,
    publish,
    reuse,
    transient_failure,
    verify_download,
    with_retries,
)
from convnets.errors import DataError

log = logging.getLogger(__name__)

TOKEN_PAGE = "https://www.kaggle.com/settings/api"
NO_CREDENTIALS = (
    "no usable Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN), "
    f"or save kaggle.json in ~/.kaggle/ (or $KAGGLE_CONFIG_DIR); create a token at {TOKEN_PAGE}"
)


def download_competition(competition: str, downloads_dir: Path, retries: int, backoff_s: float) -> Path:
    """Return <downloads_dir>/<competition>.zip, downloading it unless a verified copy is there."""
    target = prepare_downloads_dir(downloads_dir) / f"{competition}.zip"
    if reuse(target):
        return target
    with only_download(target):
        if reuse(target):  # another run downloaded it while this one waited
            return target
        forget(target)
        download = download_into(partial_folder(target), competition, retries, backoff_s)
        publish(download, target)
        shutil.rmtree(download.parent, ignore_errors=True)
    return target


def partial_folder(target: Path) -> Path:
    """Where the client downloads `target`: touched only under its lock, and kept when a run is
    killed, so that the next run's client resumes the partial file (~800 MB for dogs-vs-cats)."""
    folder = target.with_name(f".{target.name}.partial")
    folder.mkdir(exist_ok=True)
    return folder


def download_into(folder: Path, competition: str, retries: int, backoff_s: float) -> Path:
    """<folder>/<competition>.zip, downloaded by the client and verified."""
    api = with_kaggle_errors(
        competition, lambda: with_retries(authenticated_api, "signing in to Kaggle", retries, backoff_s)
    )
    download = folder / f"{competition}.zip"
    force = False  # let the client resume a partial file from an earlier run

    def attempt() -> None:
        nonlocal force
        quiet = not sys.stderr.isatty()  # the client's own progress bar, on a terminal only
        try:
            api.competition_download_files(competition, path=str(folder), force=force, quiet=quiet)
        except ValueError as exc:  # the client's check of the size it received
            raise IncompleteDownload(str(exc)) from None
        if not download.is_file():
            raise DataError(f"the Kaggle client reported success but {download} is not there")
        try:
            verify_download(download)
        except IncompleteDownload:
            forget(download)
            force = True
            raise

    with_kaggle_errors(
        competition,
        lambda: with_retries(attempt, f"downloading the {competition} files from Kaggle", retries, backoff_s),
    )
    return download


def authenticated_api():
    """A signed-in KaggleApi, or DataError(NO_CREDENTIALS)."""
    # The client prints a page of help and calls exit() when it finds no credentials;
    # we say it in one line instead. Credentials are never printed by it either way.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
            api.authenticate()
        except (SystemExit, OSError):  # kaggle<1.7 raises OSError at import without kaggle.json
            raise DataError(NO_CREDENTIALS) from None
    return api


def with_kaggle_errors(competition: str, action):
    """Run `action`, turning HTTP errors into one-line messages that say what to do.

    Errors are told apart by convnets.downloads.is_transient, as for URLs: a transient one
    that outlasted the retries reads as theirs ("... after N tries"), which the flow retries;
    a refusal fails at once. Only the status or the error's type is told: a client's message
    may hold the signed storage URL.
    """
    subject = f"the {competition} files from Kaggle"
    try:
        return action()
    except DataError:
        raise
    except RetriesSpent as spent:
        raise DataError(transient_failure(subject, spent.tries, describe(spent.error))) from None
    except Exception as exc:
        status = http_status(exc)
        if status == 401:
            raise DataError(
                "Kaggle did not accept the credentials (HTTP 401): check KAGGLE_USERNAME / KAGGLE_KEY "
                f"or kaggle.json, or create a new token at {TOKEN_PAGE}"
            ) from None
        if status == 403:
            raise DataError(
                f"Kaggle refused the {competition} files (HTTP 403): sign in with the account of your "
                f"credentials and accept the competition rules at "
                f"https://www.kaggle.com/competitions/{competition}/rules, then run again"
            ) from None
        if status == 404:
            raise DataError(
                f"Kaggle has no competition {competition!r} (HTTP 404): check fetch.kaggle_competition"
            ) from None
        if status is not None:
            raise DataError(f"could not download {subject}: {describe(exc)}") from None
        raise
