"""Models in S3 or an S3-compatible store (MinIO, Ceph, R2, moto): ``s3://bucket/prefix``.

boto3 finds everything the way the AWS CLI does, so kvmesh has no S3 settings of its
own: credentials (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``~/.aws``, instance roles), region (``AWS_REGION``/``AWS_DEFAULT_REGION``)
and endpoint (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``).
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

_CHUNK = 1 << 20
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "403"}
_CREDENTIALS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                "~/.aws/credentials, an instance role)")


class S3Folder(BucketFolder):
    """The objects under ``s3://bucket/prefix/``, listed and read with boto3."""

    @cached_property
    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3")

    def list_files(self) -> list[RemoteFile]:
        files = []
        with self._errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(self.prefix):]
                    if name and not name.endswith("/"):  # "folder" placeholder objects
                        files.append(RemoteFile(name, int(obj["Size"]), obj["ETag"]))
        return files

    def download(self, file: RemoteFile, out: Sink, start: int) -> None:
        # IfMatch: a resumed file continues the very object its first bytes came from.
        args = {"Bucket": self.bucket, "Key": self.prefix + file.name, "IfMatch": file.version}
        if start:
            args["Range"] = f"bytes={start}-"
        with self._errors(file.name):
            body = self.client.get_object(**args)["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                out.write(chunk)

    @contextlib.contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        """boto's exceptions as one ModelNotFoundError naming the URI and what is
        missing; the original goes to the debug log, not into the user's face."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as exc:
            log.debug("S3 credentials", exc_info=exc)
            raise ModelNotFoundError(f"{self.uri}: no AWS credentials; {_CREDENTIALS}") from None
        except EndpointConnectionError as exc:
            log.debug("S3 endpoint", exc_info=exc)
            raise ModelNotFoundError(
                f"{self.uri}: cannot reach the S3 endpoint {exc.kwargs.get('endpoint_url')} "
                "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)") from None
        except ClientError as exc:
            log.debug("S3 request", exc_info=exc)
            raise ModelNotFoundError(f"{self.uri}: {self._explain(exc, name)}") from None

    def _explain(self, exc: Any, name: str | None) -> str:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        if code == "NoSuchBucket":
            return f"bucket {self.bucket!r} does not exist"
        if code in ("NoSuchKey", "404"):
            return f"object {self.prefix}{name} does not exist (deleted during the download?)"
        if code in ("PreconditionFailed", "412"):
            return f"{name} changed during the download; starting again fetches the new version"
        if code in _DENIED:
            return f"access denied ({code}); {_CREDENTIALS}"
        return f"{code or 'error'}: {error.get('Message', exc)}"

