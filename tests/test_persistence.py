"""Images outlive the app that stored them; interrupted uploads leave no trace."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

from asgilook_aiohttp.journal import SPARE_IDS
from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.durable import write_durably
from asgilook_aiohttp.storage.scratch import Scratch
from asgilook_aiohttp.storage.sqlite import SqliteIndex

import samples
from checks import (
    ClientFactory,
    assert_nothing_stored,
    assert_problem,
    fill_the_queue,
    image_file,
    image_object,
    index_rows,
    stored_files,
)


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
    # a journaled pending id whose file is in place, and stray staging files; and then
    # the lease of the node that crashed ran out.
    interrupted = str(uuid.uuid4())
    scratch = Scratch(storage)
    scratch.open()
    index = SqliteIndex(storage / INDEX_FILE, storage / RESERVE_FILE)
    await index.open()
    await index.journal([interrupted], "a-node-that-crashed", 0)
    await index.close()
    final = image_file(storage, interrupted)
    final.parent.mkdir(parents=True)
    write_durably(final, samples.encode(samples.two_tone(), "JPEG"))
    write_durably(scratch.path(".upload"), b"half an upload")
    write_durably(scratch.path(".jpeg"), b"half a conversion")
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
    write_durably(Scratch(storage).path(".upload"), b"stray")

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


async def test_spare_ids_another_node_swept_are_not_handed_out_once_a_renewal_finds_them_gone(
    make_client: ClientFactory, storage: Path
) -> None:
    lease = 2.0
    client = await make_client(lease_seconds=lease)
    assert (await client.post("/images", data=samples.small_png())).status == 201
    # Another node's sweep took the spare ids over and undid them, their lease having
    # run out while this node's renewal was on its way: the renewals find them gone.
    with sqlite3.connect(storage / INDEX_FILE) as db:
        db.execute("DELETE FROM pending")
    # Renewals come every third of the lease; past the lease, even one that had not
    # been renewed would be let go.
    await asyncio.sleep(lease + 0.5)
    assert (await client.post("/images", data=samples.small_png())).status == 201


async def test_an_upload_refused_for_a_full_queue_gives_its_id_back(
    make_client: ClientFactory, storage: Path
) -> None:
    # Refusals come fastest under overload: they must cost no journal or store round trip.
    client = await make_client(queue_size=1)
    running, queued = await fill_the_queue(client)
    assert index_rows(storage) == (0, SPARE_IDS)
    await assert_problem(await client.post("/images", data=samples.small_png()), 503, "queue-full")
    assert index_rows(storage) == (0, SPARE_IDS)
    assert (await running).status == (await queued).status == 201
    assert index_rows(storage) == (2, SPARE_IDS - 2)
