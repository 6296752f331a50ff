"""One bucket of an S3-compatible store (S3, Cloud Storage's XML API with HMAC keys,
MinIO, moto's server), reached with aiobotocore on the event loop.

The ingress presigns uploads and checks the object a job names; the worker reads it, and
writes the outputs too large to travel inline.
An upload's key carries its owner (`uploads/<owner>/<id>`), so a job can name only its
own tenant's uploads. Every failure to reach the store is `StoreUnavailable`: the ingress
answers 503 (nothing is accepted), the worker retries the job.
"""

from __future__ import annotations

import contextlib
import io
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

JSON_TYPE = "application/json"
# Objects larger than this are written in parts of this size (S3's smallest part is 5 MiB).
PART_BYTES = 8 * 2**20
READ_CHUNK_BYTES = 2**20
UPLOAD_REF = re.compile(r"^uploads/(?P<owner>[0-9a-z]{1,64})/(?P<id>[0-9a-f]{32})$")
# An owner segment for uploads made with authentication off (no API key, no owner digest).
ANONYMOUS_OWNER = "anonymous"


class StoreUnavailable(Exception):
    """The store did not answer, or refused for a reason other than a missing object."""


class ObjectTooLarge(Exception):
    """The object is larger than the reader allows."""


class ObjectMissing(Exception):
    """There is no such object (never written, or deleted)."""


@dataclass(frozen=True)
class StoreSettings:
    endpoint_url: str
    bucket: str = "inferq"
    region: str = "us-east-1"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    # Where callers reach the store, when not where the platform does: presigned URLs name it.
    public_endpoint_url: str | None = None


def upload_key(owner: str) -> str:
    """A new upload's key, under its owner's prefix."""
    return f"uploads/{owner or ANONYMOUS_OWNER}/{uuid.uuid4().hex}"


def owner_of(ref: str) -> str | None:
    """The owner segment of an upload reference; None when it is not one."""
    match = UPLOAD_REF.match(ref)
    return None if match is None else match["owner"]


class ObjectStore:
    """An open client for one bucket; `async with ObjectStore(settings) as store`."""

    def __init__(self, settings: StoreSettings, timeout_s: float = 10.0) -> None:
        self.settings = settings
        self._config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
        )
        self._clients = contextlib.AsyncExitStack()
        self._client: Any = None
        # Presigns for the address callers reach (signing needs no connection to it).
        self._presigner: Any = None

    async def __aenter__(self) -> ObjectStore:
        platform = self._create_client(self.settings.endpoint_url)
        self._client = await self._clients.enter_async_context(platform)
        public = self.settings.public_endpoint_url
        self._presigner = (
            self._client
            if public in (None, self.settings.endpoint_url)
            else await self._clients.enter_async_context(self._create_client(public))
        )
        return self

    def _create_client(self, endpoint_url: str | None) -> Any:
        return get_session().create_client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=self.settings.region,
            aws_access_key_id=self.settings.access_key_id,
            aws_secret_access_key=self.settings.secret_access_key,
            config=self._config,
        )

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self._clients.__aexit__(kind, error, trace)

    async def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (the local server starts empty)."""
        try:
            await self._client.head_bucket(Bucket=self.settings.bucket)
        except ClientError as exc:
            if _status(exc) != 404:
                raise StoreUnavailable(f"bucket {self.settings.bucket}: {exc}") from exc
            try:
                await self._client.create_bucket(Bucket=self.settings.bucket)
            except (ClientError, BotoCoreError) as refused:
                raise StoreUnavailable(f"cannot create bucket {self.settings.bucket}: {refused}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"the object store at {self.settings.endpoint_url}: {exc}") from exc

    async def presigned_put(self, key: str, expires_s: int) -> str:
        """A URL a client PUTs the object's bytes to, directly, until it expires."""
        return await self._presigned("put_object", key, expires_s)

    async def presigned_get(self, key: str, expires_s: int) -> str:
        """A URL anyone holding it can GET the object from, until it expires."""
        return await self._presigned("get_object", key, expires_s)

    async def _presigned(self, operation: str, key: str, expires_s: int) -> str:
        try:
            url: str = await self._presigner.generate_presigned_url(
                operation, Params={"Bucket": self.settings.bucket, "Key": key}, ExpiresIn=expires_s
            )
        except BotoCoreError as exc:
            raise StoreUnavailable(f"cannot presign {operation} of {key}: {exc}") from exc
        return url

    async def put(self, key: str, data: bytes) -> None:
        """Write the object: up to PART_BYTES with one PUT of the bytes as they are (the
        client wraps bytes without a copy and sends them from the event loop); over it in
        parts, a part's copy at a time."""
        if len(data) > PART_BYTES:
            async with self.writer(key) as out:
                await out.write(data)
            return
        try:
            await self._client.put_object(
                Bucket=self.settings.bucket, Key=key, Body=data, ContentType=JSON_TYPE
            )
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"cannot write {key}: {exc}") from exc

    async def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is no such object."""
        try:
            head = await self._client.head_object(Bucket=self.settings.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                return None
            raise StoreUnavailable(f"{key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{key}: {exc}") from exc
        return int(head["ContentLength"])

    async def read(self, key: str, max_bytes: int) -> bytearray | None:
        """The object's bytes, read a chunk at a time into one buffer of its size (no
        second copy), refused past `max_bytes`; None when there is no such object."""
        try:
            size, chunks = await self._opened(key, max_bytes)
            data = bytearray(size)
            received = 0
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    data[received : received + len(chunk)] = chunk
                    received += len(chunk)
        except ObjectMissing:
            return None
        return data

    async def chunks(self, key: str, max_bytes: int) -> AsyncGenerator[bytes, None]:
        """The object's bytes a chunk at a time, for a reader that never holds it whole;
        ObjectMissing, ObjectTooLarge (past `max_bytes`) or StoreUnavailable, also midway."""
        _, chunks = await self._opened(key, max_bytes)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk

    async def _opened(self, key: str, max_bytes: int) -> tuple[int, AsyncGenerator[bytes, None]]:
        """The object's size and its chunks, which end exactly at that size."""
        try:
            answer = await self._client.get_object(Bucket=self.settings.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404:
                raise ObjectMissing(key) from exc
            raise StoreUnavailable(f"{key}: {exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"{key}: {exc}") from exc
        size = int(answer["ContentLength"])
        if size > max_bytes:
            answer["Body"].close()
            raise ObjectTooLarge(f"{key} holds {size} bytes, over {max_bytes}")
        return size, self._body_chunks(key, answer["Body"], size)

    @staticmethod
    async def _body_chunks(key: str, body: Any, size: int) -> AsyncGenerator[bytes, None]:
        received = 0
        try:
            async with body as stream:
                while chunk := await stream.read(READ_CHUNK_BYTES):
                    received += len(chunk)
                    if received > size:
                        raise StoreUnavailable(f"{key} sent more than its {size} bytes")
                    yield chunk
        except (ClientError, BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"{key}: {exc}") from exc
        if received != size:
            raise StoreUnavailable(f"{key} ended after {received} of its {size} bytes")

    def writer(self, key: str) -> ObjectWriter:
        """A writer of one object sent a part at a time: `async with store.writer(key) as
        out: await out.write(data)`; the object exists once the block ends without error."""
        return ObjectWriter(self._client, self.settings.bucket, key)

    async def listed(self, prefix: str) -> AsyncIterator[tuple[str, datetime]]:
        """Every object under `prefix`, with when it was last written, a page at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix):
                for entry in page.get("Contents", []):
                    yield entry["Key"], entry["LastModified"]
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"cannot list {prefix}: {exc}") from exc

    async def delete(self, key: str) -> None:
        try:
            await self._client.delete_object(Bucket=self.settings.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"cannot delete {key}: {exc}") from exc


class _PartBody(io.RawIOBase):
    """A part's buffer as the file the client reads a body from, without a copy of it
    (io.BytesIO copies a bytearray; raw bytes are the one body the client wraps itself).
    The HTTP client reads such a file in 64 KiB pieces on its thread pool: a few ms per
    part, where a copy of the part would double what a streamed job holds."""

    def __init__(self, buffer: memoryview) -> None:
        super().__init__()
        self._view = buffer
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        count = min(len(target), len(self._view) - self._position)
        target[:count] = self._view[self._position : self._position + count]
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position


class ObjectWriter:
    """One object written as it is produced, holding one part (PART_BYTES) at most: a
    buffer of that size, filled, sent and filled again; full parts go out as a multipart
    upload, and an object that never fills one is written with one PUT. An error inside
    the block aborts the upload: no partial object is left behind. StoreUnavailable when
    the store does not take it."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self._client = client
        self._bucket = bucket
        self.key = key
        # Made once, at its full size: a buffer grown as it fills is copied as it grows.
        self._part: bytearray | None = None
        self._filled = 0
        self._upload_id: str | None = None
        self._sent: list[dict[str, Any]] = []

    async def __aenter__(self) -> ObjectWriter:
        return self

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        rest = memoryview(data).cast("B")
        while rest:
            if self._part is None:
                self._part = bytearray(PART_BYTES)
            taken = rest[: PART_BYTES - self._filled]
            self._part[self._filled : self._filled + len(taken)] = taken
            self._filled += len(taken)
            rest = rest[len(taken) :]
            if self._filled == PART_BYTES:
                await self._send_part()

    def _filled_part(self) -> memoryview:
        return memoryview(self._part or b"")[: self._filled]

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        try:
            if kind is not None:
                await self._abort()
                return
            try:
                await self._finish()
            except BaseException:
                await self._abort()
                raise
        finally:
            self._part = None

    async def _finish(self) -> None:
        if self._upload_id is None:
            try:
                await self._client.put_object(
                    Bucket=self._bucket,
                    Key=self.key,
                    Body=_PartBody(self._filled_part()),
                    ContentType=JSON_TYPE,
                )
            except (ClientError, BotoCoreError) as exc:
                raise StoreUnavailable(f"cannot write {self.key}: {exc}") from exc
            return
        if self._filled:
            await self._send_part()
        try:
            await self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._sent},
            )
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"cannot complete {self.key}: {exc}") from exc

    async def _send_part(self) -> None:
        # The client has read the whole part when upload_part returns (a retry inside it
        # reads it again): only then is the buffer filled again.
        try:
            if self._upload_id is None:
                created = await self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self.key, ContentType=JSON_TYPE
                )
                self._upload_id = created["UploadId"]
            number = len(self._sent) + 1
            sent = await self._client.upload_part(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=_PartBody(self._filled_part()),
            )
        except (ClientError, BotoCoreError) as exc:
            raise StoreUnavailable(f"cannot write part of {self.key}: {exc}") from exc
        self._sent.append({"PartNumber": number, "ETag": sent["ETag"]})
        self._filled = 0

    async def _abort(self) -> None:
        if self._upload_id is not None:
            with contextlib.suppress(ClientError, BotoCoreError):
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self.key, UploadId=self._upload_id
                )


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
