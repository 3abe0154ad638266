"""Objects under one URL prefix, over fsspec: plain reads and writes, and the two conditional
writes the shared registry is built on (create-only, and replace-only-if-unchanged).

fsspec gives every store the same listing, upload and download calls, but no common way to say
"only if absent" or "only if unchanged"; each store spells them its own way (S3: `If-None-Match: *`
and `If-Match: <etag>` on a PUT; GCS: `ifGenerationMatch`). `S3Blobs` drives S3 and S3-compatible
stores through s3fs; another store plugs in as another `Blobs` subclass.

Endpoint, region and credentials come from the standard AWS environment (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`,
`AWS_DEFAULT_REGION`, or an instance role), never from tuneloop's settings, so no secret sits in
a config file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .base import RegistryUnavailable

log = logging.getLogger(__name__)

SETTING = "registry_url"
# A store that does not answer should fail a start or a poll in seconds, not botocore's minutes.
_CONNECT_TIMEOUT_S = 5
_READ_TIMEOUT_S = 60
_ATTEMPTS = 3
# What botocore builds a client from; a change (a test, a rotated key) gets a new client.
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)
_clients: dict[tuple[str | None, ...], Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str  # the store's version tag of exactly these bytes, for `replace`


class Blobs(Protocol):
    """Keys are '/'-separated paths under the URL's prefix. Every method raises
    RegistryUnavailable when the store does not answer."""

    url: str

    def read(self, key: str) -> Blob | None:
        """The object's bytes and tag in one request, or None if there is none."""
        ...

    def etag(self, key: str) -> str | None:
        """The object's tag without its bytes (a HEAD), or None if there is none."""
        ...

    def write(self, key: str, data: bytes) -> None: ...

    def create(self, key: str, data: bytes) -> bool:
        """Write only if no object has this key; False if one does (another writer's)."""
        ...

    def replace(self, key: str, data: bytes, etag: str) -> bool:
        """Overwrite only if the object still carries `etag`; False if it changed or vanished."""
        ...

    def children(self, key: str) -> list[str]:
        """Names directly under `key/` (objects and deeper prefixes alike), one listing request."""
        ...

    def upload(self, local: Path, key: str) -> None: ...

    def download(self, key: str, local: Path) -> None:
        """Raises FileNotFoundError if there is no such object."""
        ...


def open_blobs(url: str) -> Blobs:
    """The store a `registry_url` names, checked to answer; `RegistryUnavailable` otherwise."""
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "s3a"):
        return S3Blobs.connect(url)
    if not scheme:
        raise RegistryUnavailable(
            f"{SETTING} {url!r} is not a URL: use s3://BUCKET/PREFIX, or leave it empty for a local directory"
        )
    raise RegistryUnavailable(
        f"{SETTING} {url!r}: the shared registry needs create-only and compare-and-swap writes, which tuneloop "
        f"drives for s3:// (AWS S3 and S3-compatible stores through AWS_ENDPOINT_URL), not {scheme}://; "
        "use an s3:// URL, or leave it empty for a local directory"
    )


class S3Blobs:
    def __init__(self, fs: Any, bucket: str, prefix: str, url: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.prefix = prefix
        self.url = url

    @classmethod
    def connect(cls, url: str) -> S3Blobs:
        import s3fs  # noqa: PLC0415 - imported only when a registry URL is set

        parts = urlsplit(url)
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket or ".." in prefix.split("/"):
            raise RegistryUnavailable(f"{SETTING} {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
        # A client costs ~0.5 s to build (botocore loads its service model): one per process and
        # environment, shared by every registry opened in it (they read and write without caching).
        env = tuple(os.environ.get(v) for v in _AWS_ENV)
        with _clients_lock:
            fs = _clients.get(env)
            if fs is None:
                fs = s3fs.S3FileSystem(
                    # Listings are the registry's state: never answer one from a cache.
                    use_listings_cache=False,
                    skip_instance_cache=True,
                    config_kwargs={
                        "connect_timeout": _CONNECT_TIMEOUT_S,
                        "read_timeout": _READ_TIMEOUT_S,
                        "retries": {"max_attempts": _ATTEMPTS, "mode": "standard"},
                    },
                )
                fs.retries = _ATTEMPTS
                _clients[env] = fs
        blobs = cls(fs, bucket, prefix, url)
        blobs._check_reachable()
        return blobs

    def _check_reachable(self) -> None:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
        where = f"{SETTING} {self.url!r} (endpoint {endpoint})"
        try:
            self.fs.call_s3("head_bucket", Bucket=self.bucket)
        except FileNotFoundError:
            raise RegistryUnavailable(
                f"{where}: bucket {self.bucket!r} does not exist; create it, or point {SETTING} at another one"
            ) from None
        except PermissionError as exc:
            raise RegistryUnavailable(
                f"{where}: access to bucket {self.bucket!r} was refused ({exc}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's policy"
            ) from None
        except Exception as exc:  # noqa: BLE001 - botocore's credential and connection errors share no base
            raise RegistryUnavailable(
                f"{where} cannot be reached: {type(exc).__name__}: {exc}. Set AWS_ENDPOINT_URL for an "
                "S3-compatible store, and AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an "
                "instance role) for credentials"
            ) from None

    @contextlib.contextmanager
    def _answering(self, what: str, key: str) -> Iterator[None]:
        """Store failures (no connection, timeouts, refusals) as RegistryUnavailable: the caller
        keeps what it has and tries again later. Absent and already-present objects are answers."""
        try:
            yield
        except (FileNotFoundError, FileExistsError, RegistryUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's and aiohttp's errors share no base
            raise RegistryUnavailable(
                f"{SETTING} {self.url!r}: {what} {key} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{self._key(key)}"

    def read(self, key: str) -> Blob | None:
        from fsspec.asyn import sync  # noqa: PLC0415

        async def get() -> Blob | None:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            except FileNotFoundError:
                return None
            try:
                # Bytes and tag from one response: a tag read by a separate HEAD could belong to a
                # newer object than the bytes, and a replace would then drop that writer's change.
                return Blob(await resp["Body"].read(), str(resp["ETag"]))
            finally:
                resp["Body"].close()

        with self._answering("GET", key):
            result: Blob | None = sync(self.fs.loop, get)
        return result

    def etag(self, key: str) -> str | None:
        with self._answering("HEAD", key):
            try:
                return str(self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(key))["ETag"])
            except FileNotFoundError:
                return None

    def write(self, key: str, data: bytes) -> None:
        with self._answering("PUT", key):
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(key), Body=data)

    def create(self, key: str, data: bytes) -> bool:
        return self._put_if(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str) -> bool:
        return self._put_if(key, data, IfMatch=etag)

    def _put_if(self, key: str, data: bytes, **condition: str) -> bool:
        with self._answering("conditional PUT", key):
            try:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            except FileExistsError:  # s3fs's name for 412 PreconditionFailed on If-None-Match
                return False
            except FileNotFoundError:  # If-Match on an object deleted meanwhile
                return False
            except OSError as exc:
                if _lost_race(exc):
                    return False
                raise
            return True

    def children(self, key: str) -> list[str]:
        base = self._key(key).strip("/")
        prefix = f"{base}/" if base else ""  # a bucket's root lists with no prefix at all
        names: list[str] = []
        token: dict[str, str] = {}
        with self._answering("LIST", prefix):
            while True:
                page = self.fs.call_s3(
                    "list_objects_v2", Bucket=self.bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000, **token
                )
                names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
                names += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
                if not page.get("IsTruncated"):
                    return names
                token = {"ContinuationToken": page["NextContinuationToken"]}

    def upload(self, local: Path, key: str) -> None:
        with self._answering("upload to", key):
            self.fs.put_file(str(local), self._path(key))

    def download(self, key: str, local: Path) -> None:
        with self._answering("download of", key):
            self.fs.get_file(self._path(key), str(local))


# 412: the condition did not hold. 409: S3 refused one of two conditional writes racing on one key
# (it asks the loser to retry, which the caller does by reading again).
_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def _lost_race(exc: OSError) -> bool:
    """Whether s3fs's error (it keeps botocore's ClientError as the cause) says a conditional
    write lost to another writer, rather than that the store failed."""
    response = getattr(exc.__cause__, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in _RACE_CODES
