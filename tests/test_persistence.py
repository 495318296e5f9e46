"""Images outlive the app that stored them; interrupted uploads leave no trace."""

from __future__ import annotations

import uuid
from pathlib import Path

from asgilook_aiohttp.blobs import Blobs, write_durably
from asgilook_aiohttp.index import Index
from asgilook_aiohttp.store import INDEX_FILE, SPARE_IDS

import samples
from checks import ClientFactory, assert_nothing_stored, image_object, index_rows, stored_files


async def test_a_second_app_on_the_same_storage_sees_the_same_images(
    make_client: ClientFactory, storage: Path
) -> None:
    first = await make_client()
    uploaded = []
    for fmt in ("PNG", "JPEG", "GIF"):
        response = await first.post("/images", data=samples.encode(samples.two_tone(), fmt))
        image = image_object(await response.json())
        image_bytes = await (await first.get(image["image"])).read()
        uploaded.append((image, image_bytes))
    await first.close()

    second = await make_client()
    assert await (await second.get("/images")).json() == [image for image, _ in uploaded]
    for image, image_bytes in uploaded:
        assert await (await second.get(f"/images/{image['id']}")).json() == image
        assert await (await second.get(image["image"])).read() == image_bytes


async def test_startup_sweeps_what_an_interrupted_upload_left(
    make_client: ClientFactory, storage: Path
) -> None:
    # The state a crash leaves between moving the file into place and the index commit:
    # a journaled pending id whose file is in place, and stray staging files.
    interrupted = str(uuid.uuid4())
    blobs = Blobs(storage)
    blobs.open()
    index = Index(storage / INDEX_FILE)
    await index.open()
    await index.add_pending([interrupted])
    await index.close()
    final = blobs.path(interrupted)
    final.parent.mkdir(parents=True)
    write_durably(final, samples.encode(samples.two_tone(), "JPEG"))
    write_durably(blobs.staging_path(".upload"), b"half an upload")
    write_durably(blobs.staging_path(".jpeg"), b"half a conversion")
    assert len(stored_files(storage)) == 3
    assert index_rows(storage) == (0, 1)

    client = await make_client()
    assert_nothing_stored(storage)
    assert await (await client.get("/images")).json() == []
    assert (await client.get(f"/images/{interrupted}.jpeg")).status == 404


async def test_sweep_keeps_complete_images(make_client: ClientFactory, storage: Path) -> None:
    first = await make_client()
    image = await (await first.post("/images", data=samples.small_png())).json()
    await first.close()
    write_durably(Blobs(storage).staging_path(".upload"), b"stray")

    second = await make_client()
    assert stored_files(storage) == [
        f"images/{image['id'][:2]}/{image['id'][2:4]}/{image['id']}.jpeg"
    ]
    assert index_rows(storage) == (1, 0)
    assert (await second.get(image["image"])).status == 200


async def test_ids_are_journaled_ahead_and_each_is_cleared_once_used(
    make_client: ClientFactory, storage: Path
) -> None:
    client = await make_client()
    png = samples.small_png()
    assert index_rows(storage) == (0, 0)
    assert (await client.post("/images", data=png)).status == 201
    assert index_rows(storage) == (1, SPARE_IDS - 1)  # a batch journaled, one id used
    assert (await client.post("/images", data=b"not an image")).status == 415
    # A refused upload's id is given back unused: no journal write for a refusal.
    assert index_rows(storage) == (1, SPARE_IDS - 1)
    for _ in range(SPARE_IDS):  # the rest of the batch, then one from a new batch
        assert (await client.post("/images", data=png)).status == 201
    assert index_rows(storage) == (SPARE_IDS + 1, SPARE_IDS - 1)
    listed = await (await client.get(f"/images?limit={SPARE_IDS + 2}")).json()
    assert len({image["id"] for image in listed}) == SPARE_IDS + 1
    await client.close()
    assert index_rows(storage) == (SPARE_IDS + 1, 0)  # spare ids are let go at shutdown
