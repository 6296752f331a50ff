"""The object store client against a real S3-compatible server (moto's): large objects go
in parts and come back whole, byte for byte; a read refuses what is over its limit."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import httpx
import pytest
from aiobotocore.session import get_session

from object_store.store import PART_BYTES, ObjectStore, ObjectTooLarge, StoreSettings


async def test_given_an_object_over_a_part_when_written_then_it_reads_back_byte_for_byte(
    store: ObjectStore,
) -> None:
    data = b"".join(hashlib.sha256(str(n).encode()).digest() for n in range(PART_BYTES * 5 // 2 // 32 + 7))

    await store.put("outputs/store-test-parts", data)
    read = await store.read("outputs/store-test-parts", max_bytes=len(data))

    assert len(data) > 2 * PART_BYTES, "three parts, the last a short one"
    assert await store.size("outputs/store-test-parts") == len(data)
    assert read is not None and hashlib.sha256(read).digest() == hashlib.sha256(data).digest()


async def test_given_an_object_over_the_readers_limit_then_the_read_refuses_it(store: ObjectStore) -> None:
    await store.put("outputs/store-test-limit", b"x" * 1001)

    with pytest.raises(ObjectTooLarge, match="1001 bytes, over 1000"):
        await store.read("outputs/store-test-limit", max_bytes=1000)
    assert await store.read("outputs/store-test-missing", max_bytes=1000) is None


async def test_given_a_public_endpoint_then_presigned_urls_name_it_and_work_through_it(
    object_store: StoreSettings,
) -> None:
    """The platform reaches the store at one address, callers at another (kind's MinIO
    through a port-forward): the URLs are signed for the callers' address."""
    public = object_store.endpoint_url.replace("127.0.0.1", "localhost")
    async with ObjectStore(replace(object_store, public_endpoint_url=public)) as store:
        upload_url = await store.presigned_put("uploads/anonymous/" + "c" * 32, 600)
        async with httpx.AsyncClient() as caller:
            put = await caller.put(upload_url, content=b'{"n": 1}')
        size = await store.size("uploads/anonymous/" + "c" * 32)

    assert upload_url.startswith(public + "/")
    assert put.status_code == 200 and size == 8


async def test_given_a_writer_that_fails_after_sending_parts_then_no_object_and_no_open_upload_is_left(
    store: ObjectStore, object_store: StoreSettings
) -> None:
    """A JSON Lines job that fails midway: what it sent is aborted, not left to cost storage."""
    key = "outputs/store-test-aborted"

    with pytest.raises(RuntimeError, match="the model failed"):
        async with store.writer(key) as out:
            await out.write(b"y" * (2 * PART_BYTES + 5))
            raise RuntimeError("the model failed")

    assert await store.size(key) is None
    async with get_session().create_client(
        "s3",
        endpoint_url=object_store.endpoint_url,
        region_name=object_store.region,
        aws_access_key_id=object_store.access_key_id,
        aws_secret_access_key=object_store.secret_access_key,
    ) as s3:
        listed = await s3.list_multipart_uploads(Bucket=object_store.bucket, Prefix=key)
    assert listed.get("Uploads", []) == [], "the multipart upload was aborted"


async def test_given_chunks_written_in_any_sizes_then_the_object_is_their_concatenation(
    store: ObjectStore,
) -> None:
    pieces = [bytes([n % 251]) * size for n, size in enumerate([1, PART_BYTES - 1, 3, PART_BYTES * 2, 0, 17])]

    async with store.writer("outputs/store-test-pieces") as out:
        for piece in pieces:
            await out.write(piece)
    read = await store.read("outputs/store-test-pieces", max_bytes=2**30)

    assert read is not None and bytes(read) == b"".join(pieces)
