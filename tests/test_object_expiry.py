"""Objects expire with their job's record, on a real S3-compatible server (moto's): the
sweep deletes uploads and outputs older than RESULT_TTL_S and nothing else, an ingress
runs it, and a canceled job's upload is deleted at once."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx

from ingress.settings import IngressSettings
from object_store.expiry import sweep
from object_store.store import ObjectStore, StoreSettings
from tests.conftest import running_ingress, upload_json, wait_until


async def _upload(client: httpx.AsyncClient, value: object) -> str:
    ref: str = (await upload_json(client, value))["input_ref"]
    return ref


async def test_given_objects_older_than_the_ttl_then_a_sweep_deletes_uploads_and_outputs_only(
    store: ObjectStore,
) -> None:
    keys = ["uploads/anonymous/" + "a" * 32, "outputs/expiry-test-job", "elsewhere/expiry-test"]
    for key in keys:
        await store.put(key, b"{}")

    kept_while_young = await sweep(store, ttl_s=3600)
    deleted = await sweep(store, ttl_s=3600, now=datetime.now(UTC) + timedelta(seconds=3601))

    assert kept_while_young == 0
    assert deleted >= 2  # and any older test's objects
    assert [await store.size(key) for key in keys] == [None, None, 2]


async def test_given_an_ingress_with_a_short_ttl_then_its_sweeper_deletes_an_unused_upload(
    ingress_settings: IngressSettings, object_store: StoreSettings, store: ObjectStore
) -> None:
    settings = replace(
        ingress_settings, object_store=object_store, result_ttl_s=1, store_sweep_interval_s=0.2
    )
    async with running_ingress(settings) as client:
        ref = await _upload(client, {"n": 1})
        assert await store.size(ref) == 8

        async def gone() -> bool:
            return await store.size(ref) is None

        await wait_until(gone, 15, "the upload deleted by the ingress's sweeper")


async def test_given_a_queued_job_naming_an_upload_when_it_is_canceled_then_the_upload_is_deleted(
    ingress_settings: IngressSettings, object_store: StoreSettings, store: ObjectStore
) -> None:
    async with running_ingress(replace(ingress_settings, object_store=object_store)) as client:
        named, other = await _upload(client, {"n": 1}), await _upload(client, {"n": 2})
        submitted = await client.post("/v1/models/echo/jobs", json={"input_ref": named})  # no worker: queued
        canceled = await client.post(f"/v1/jobs/{submitted.json()['id']}/cancel")

    assert submitted.status_code == 202 and canceled.status_code == 200, canceled.text
    assert await store.size(named) is None, "the canceled job's upload is deleted"
    assert await store.size(other) == 8, "an upload no canceled job named is kept"
