"""Blobs in an S3 bucket, shared by every node, through one aiobotocore client per node.

Every call is bounded by the timeout as a whole, and so is each chunk of a body being
streamed: botocore's own defaults (60 s, with retries) would hold a request for minutes
on a store that is down or stopped. Whatever fails to answer in time, or answers with an
error, is ``Unavailable``; only a missing object is ``BlobMissing``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Collection
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from .ports import (
    SET_ASIDE,
    BlobMissing,
    Destination,
    HandBack,
    Stored,
    StreamBody,
    Unavailable,
    blob_key,
    image_key,
    set_aside_name,
)

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3.client import S3Client
    from types_aiobotocore_s3.type_defs import ObjectTypeDef

# The most keys S3 lists, or deletes, in one request.
_PAGE = 1000
_CHUNK = 256 * 1024
# Read at a time to hash a whole object: one thread hop per MiB.
_DIGEST_CHUNK = 1024 * 1024
# Error codes of an object that is not there; a HEAD request's error has only the status.
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Blobs:
    name = "the object store"

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint: str | None,
        region: str,
        access_key: str | None,
        secret_key: str | None,
        timeout: float,
        connections: int = 128,
    ) -> None:
        """``connections`` caps the pooled connections, each held by a download for as long
        as it streams: one download more waits for a free one, up to the timeout."""
        self._bucket = bucket
        self._prefix = prefix
        self._endpoint = endpoint
        self._region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._timeout = timeout
        self._config = AioConfig(
            connect_timeout=timeout,
            read_timeout=timeout,
            # A request is not tried again within the timeout: the caller answers 503 and
            # its client tries again. (aiohttp itself retries a request once on a pooled
            # connection that the store closed meanwhile, as after a restart.)
            retries={"total_max_attempts": 1},
            max_pool_connections=connections,
            s3={
                "addressing_style": "path",
                # Integrity comes from the SHA-256 checksum sent with every PUT (checked by
                # the store), not from signing the payload, which would hash it again on
                # the event loop.
                "payload_signing_enabled": False,
            },
            signature_version="s3v4",
            # The service's model is read from disk off the event loop.
            warm_up_loader_caches=True,
        )
        self._resources = AsyncExitStack()
        self._client: S3Client | None = None

    @property
    def _where(self) -> str:
        return f"bucket {self._bucket!r} at {self._endpoint or 'AWS S3'}"

    async def open(self) -> None:
        """Create the client and check that the bucket is there. Raises ``SystemExit`` if it
        is not or may not be used, ``Unavailable`` if the store does not answer."""
        self._client = await self._resources.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=self._endpoint,
                region_name=self._region,
                aws_access_key_id=self._access_key,
                aws_secret_access_key=self._secret_key,
                config=self._config,
            )
        )
        try:
            async with self._guard("HeadBucket"):
                try:
                    await self._client.head_bucket(Bucket=self._bucket)
                except ClientError as error:
                    if _status(error) == 404:
                        raise SystemExit(
                            f"asgilook-aiohttp: there is no {self._where}: create it, or name "
                            "another one with --blobs"
                        ) from None
                    if _status(error) < 500:
                        raise SystemExit(
                            f"asgilook-aiohttp: {self._where} refuses this node "
                            f"({_describe(error)}): check the access key and its rights"
                        ) from None
                    raise
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._client = None
        await self._resources.aclose()

    async def problem(self) -> str | None:
        try:
            async with self._guard("HeadBucket"):
                await self._s3.head_bucket(Bucket=self._bucket)
        except Unavailable as error:
            return str(error)
        return None

    def destination(self, key: str) -> HandBack:
        return HandBack()

    async def keep(self, key: str, handed_back: bytes | None) -> None:
        if handed_back is None:
            raise TypeError(f"{key}: the worker handed nothing back to store")
        checksum = await asyncio.to_thread(_sha256, handed_back)
        async with self._guard("PutObject"):
            await self._s3.put_object(
                Bucket=self._bucket,
                Key=self._prefix + key,
                Body=handed_back,
                ContentType="image/jpeg",
                ChecksumSHA256=checksum,
            )

    async def abandon(self, destination: Destination) -> None:
        pass

    async def source(self, key: str) -> bytes:
        async with self._guard("GetObject", key):
            response = await self._s3.get_object(Bucket=self._bucket, Key=self._prefix + key)
            async with response["Body"] as body:
                return await body.read()

    async def body(self, key: str, offset: int, count: int) -> StreamBody:
        if count == 0:
            async with self._guard("HeadObject", key):
                await self._s3.head_object(Bucket=self._bucket, Key=self._prefix + key)
            nothing = _Chunks(self, None, 0)
            return StreamBody(nothing, 0, nothing.close)
        async with self._guard("GetObject", key):
            response = await self._s3.get_object(
                Bucket=self._bucket,
                Key=self._prefix + key,
                Range=f"bytes={offset}-{offset + count - 1}",
            )
        body = response["Body"]
        if response["ContentLength"] != count:
            # Shorter than its record says: replaced since the record was read.
            body.close()
            raise BlobMissing(key)
        chunks = _Chunks(self, body, count)
        return StreamBody(chunks, count, chunks.close)

    async def delete(self, keys: Collection[str]) -> None:
        names = [self._prefix + key for key in keys]
        for start in range(0, len(names), _PAGE):
            async with self._guard("DeleteObjects"):
                answer = await self._s3.delete_objects(
                    Bucket=self._bucket,
                    Delete={
                        "Objects": [{"Key": name} for name in names[start : start + _PAGE]],
                        "Quiet": True,
                    },
                )
            if errors := answer.get("Errors"):
                error = errors[0]
                raise Unavailable(
                    self.name,
                    f"DeleteObjects failed for {len(errors)} objects, {error.get('Key')!r} "
                    f"first: {error.get('Code')} {error.get('Message')}",
                )

    async def delete_image(self, image_id: str) -> None:
        keys = [image_key(image_id)]
        async for found in self._pages(f"thumbnails/{image_id}/"):
            keys.extend(item["Key"].removeprefix(self._prefix) for item in found)
        await self.delete(keys)

    async def stored(self) -> AsyncIterator[list[Stored]]:
        async for found in self._pages(""):
            batch = []
            for item in found:
                name = item["Key"].removeprefix(self._prefix)
                if not name.startswith(SET_ASIDE):
                    batch.append(Stored(name, name if blob_key(name) else None, item["Size"]))
            yield batch

    async def set_aside(self, key: str) -> str:
        attempt = 0
        while not await self._copy_unless_taken(key, set_aside_name(key, attempt)):
            attempt += 1
        await self.delete([key])
        return set_aside_name(key, attempt)

    async def _copy_unless_taken(self, key: str, name: str) -> bool:
        """Copy the blob ``key`` to ``name`` if nothing is there; whether it was copied."""
        async with self._guard("CopyObject", key):
            try:
                await self._s3.copy_object(
                    Bucket=self._bucket,
                    Key=self._prefix + name,
                    CopySource={"Bucket": self._bucket, "Key": self._prefix + key},
                    # In the one request: a check made before it could be outrun.
                    IfNoneMatch="*",
                )
            except ClientError as error:
                if _status(error) == 412:  # Precondition Failed: the name is taken
                    return False
                raise
        return True

    async def set_aside_count(self) -> int:
        return sum([len(found) async for found in self._pages(SET_ASIDE)])

    async def _pages(self, under: str) -> AsyncIterator[list[ObjectTypeDef]]:
        """The objects whose keys under the prefix start with ``under``, a page at a time."""
        after = ""
        while True:
            async with self._guard("ListObjectsV2"):
                listing = await self._s3.list_objects_v2(
                    Bucket=self._bucket,
                    Prefix=self._prefix + under,
                    StartAfter=after,
                    MaxKeys=_PAGE,
                )
            found = listing.get("Contents", [])
            yield found
            if not listing.get("IsTruncated") or not found:
                return
            after = found[-1]["Key"]

    async def digest(self, key: str) -> tuple[int, str]:
        async with self._guard("GetObject", key):
            response = await self._s3.get_object(Bucket=self._bucket, Key=self._prefix + key)
        sha256 = hashlib.sha256()
        size = 0
        async with response["Body"] as body:
            while True:
                async with self._guard("GetObject", key):
                    chunk = await body.read(_DIGEST_CHUNK)
                if not chunk:
                    return size, sha256.hexdigest()
                await asyncio.to_thread(sha256.update, chunk)
                size += len(chunk)

    @property
    def _s3(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("the object store's client is not open")
        return self._client

    @asynccontextmanager
    async def _guard(self, operation: str, key: str | None = None) -> AsyncIterator[None]:
        """Bound what runs within to the timeout, and tell why the store failed it."""
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except ClientError as error:
            if key is not None and error.response.get("Error", {}).get("Code") in _MISSING:
                raise BlobMissing(key) from None
            if key is not None and _status(error) == 416:
                # The range starts past its end: replaced since its record was read.
                raise BlobMissing(key) from None
            raise Unavailable(
                self.name, f"{self._where} answered {operation} with {_describe(error)}"
            ) from error
        except (BotoCoreError, aiohttp.ClientError) as error:
            raise Unavailable(self.name, f"{operation} failed: {error}") from error
        except TimeoutError:
            raise Unavailable(
                self.name, f"{self._where} did not answer {operation} within {self._timeout:g} s"
            ) from None


class _Chunks:
    """The chunks of a body as they arrive, each awaited no longer than the timeout (none
    without a body)."""

    def __init__(self, blobs: S3Blobs, body: StreamingBody | None, count: int) -> None:
        self._blobs = blobs
        self._body = body
        self._left = count

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._body is None or self._left <= 0:
            raise StopAsyncIteration
        async with self._blobs._guard("GetObject"):
            chunk = await self._body.read(min(_CHUNK, self._left))
        if not chunk:
            raise Unavailable(self._blobs.name, "the body ended early")
        self._left -= len(chunk)
        return chunk

    async def close(self) -> None:
        if self._body is not None:
            self._body.close()


def _status(error: ClientError) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _describe(error: ClientError) -> str:
    details = error.response.get("Error", {})
    return f"HTTP {_status(error)} {details.get('Code', '')} {details.get('Message', '')}".strip()


def _sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()
