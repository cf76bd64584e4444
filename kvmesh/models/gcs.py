"""Models in Google Cloud Storage: ``gs://bucket/prefix``.

google-cloud-storage finds credentials the way gcloud's libraries do
(``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, the
metadata server) and honours ``STORAGE_EMULATOR_HOST``; with no credentials at all the
bucket is read anonymously, which is what a public bucket needs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from kvmesh.core.errors import ModelNotFoundError
from kvmesh.models.cache import BucketFolder, RemoteFile, Sink

log = logging.getLogger(__name__)

_CREDENTIALS = ("set GOOGLE_APPLICATION_CREDENTIALS to a service account key, or run "
                "`gcloud auth application-default login`")


class GcsFolder(BucketFolder):
    """The objects under ``gs://bucket/prefix/``, listed and read with google-cloud-storage."""

    @cached_property
    def client(self) -> Any:
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage

        try:
            return storage.Client()
        except DefaultCredentialsError:
            log.info("no Google credentials found: reading %s anonymously", self.uri)
            return storage.Client.create_anonymous_client()

    def list_files(self) -> list[RemoteFile]:
        with self._errors():
            return [RemoteFile(blob.name[len(self.prefix):], int(blob.size), str(blob.generation))
                    for blob in self.client.list_blobs(self.bucket, prefix=self.prefix)
                    if not blob.name.endswith("/")]

    def download(self, file: RemoteFile, out: Sink, start: int) -> None:
        # The listed generation: a resumed file continues the very object it started.
        blob = self.client.bucket(self.bucket).blob(
            self.prefix + file.name, generation=int(file.version))
        with self._errors(file.name):
            # raw: bytes as stored, so offsets mean the same on every attempt
            blob.download_to_file(out, start=start or None, raw_download=True)

    @contextlib.contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        """The client's exceptions as one ModelNotFoundError naming the URI and what is
        missing; the original goes to the debug log."""
        from google.api_core import exceptions as api
        from google.auth.exceptions import GoogleAuthError

        try:
            yield
        except api.NotFound as exc:
            log.debug("GCS not found", exc_info=exc)
            what = (f"object {self.prefix}{name} does not exist (deleted during the download?)"
                    if name else f"bucket {self.bucket!r} does not exist")
            raise ModelNotFoundError(f"{self.uri}: {what}") from None
        except (api.Forbidden, api.Unauthorized, GoogleAuthError) as exc:
            log.debug("GCS access", exc_info=exc)
            raise ModelNotFoundError(
                f"{self.uri}: access denied ({type(exc).__name__}); {_CREDENTIALS}") from None
        except (api.GoogleAPICallError, api.RetryError) as exc:
            log.debug("GCS request", exc_info=exc)
            raise ModelNotFoundError(f"{self.uri}: {exc}") from None
