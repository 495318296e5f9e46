"""``asgilook-aiohttp delete``: the operator takes images down, without their tokens,
while the server runs."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from asgilook_aiohttp.storage.backends import INDEX_FILE

import samples
from checks import stored_files
from cluster import Library
from serving import Server, run_command, running

PNG = samples.encode(samples.two_tone((640, 480)), "PNG")
_CONCURRENT = 16


async def upload_with_thumbnail(session: aiohttp.ClientSession, server: Server) -> str:
    async with session.post(f"{server.url}/images", data=PNG) as response:
        assert response.status == 201
        created = await response.json()
    async with session.get(f"{server.url}{created['thumbnails'][0]}") as response:
        assert response.status == 200
    image_id: str = created["id"]
    return image_id


async def statuses(server: Server, image_id: str) -> set[int]:
    """What every URL of the image answers, each asked on connections of their own at
    once, so that every HTTP process answers some."""
    urls = [f"/images/{image_id}", f"/images/{image_id}.jpeg"]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:

        async def status(path: str) -> int:
            async with fresh.get(f"{server.url}{path}") as response:
                return response.status

        return set(await asyncio.gather(*(status(urls[n % 2]) for n in range(_CONCURRENT))))


async def test_an_image_taken_down_is_gone_from_every_process_and_after_a_restart(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    async with running(storage, "--http-processes", "2") as server:
        taken_down = await upload_with_thumbnail(session, server)
        kept = await upload_with_thumbnail(session, server)
        async with session.get(f"{server.url}/images/{taken_down}") as response:
            thumbnail = (await response.json())["thumbnails"][0]
        status, out, err = await run_command(
            "delete", "--storage", str(storage), taken_down, "--reason", "report #12:  spam"
        )
        assert status == 0, err
        assert out == f"{taken_down}: deleted\n"
        assert "WARNING" in err
        assert f"image {taken_down} deleted by the operator" in err
        assert "reason: report #12: spam" in err
        assert await statuses(server, taken_down) == {404}
        async with session.get(f"{server.url}{thumbnail}") as response:
            assert response.status == 404
        assert not [name for name in stored_files(storage) if taken_down in name]
        assert await statuses(server, kept) == {200}
    async with running(storage) as server:
        assert await statuses(server, taken_down) == {404}
        async with session.get(f"{server.url}/images") as response:
            assert [image["id"] for image in await response.json()] == [kept]


async def test_an_id_that_names_no_image_is_said_and_the_rest_are_deleted(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    absent = "00000000-0000-4000-8000-000000000000"
    async with running(storage) as server:
        image_id = await upload_with_thumbnail(session, server)
        status, out, _ = await run_command(
            "delete",
            "--storage",
            str(storage),
            absent,
            f"{server.url}/thumbnails/{image_id}/1x1.jpeg?x#y",
        )
        assert status == 1
        assert f"{absent}: no such image in the library in {storage}\n" in out
        assert f"{image_id}: deleted\n" in out
        assert await statuses(server, image_id) == {404}


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["not-an-id"], "is not an image id"),
        (["/images/not-an-id.jpeg"], "is not an image id"),
        ([], "the following arguments are required: ID"),
    ],
)
async def test_a_bad_command_line_exits_2_and_says_why(
    tmp_path: Path, argv: list[str], said: str
) -> None:
    status, _, err = await run_command("delete", "--storage", str(tmp_path), *argv)
    assert status == 2
    assert said in err


async def test_a_directory_without_a_library_is_not_made_one(tmp_path: Path) -> None:
    status, _, err = await run_command(
        "delete", "--storage", str(tmp_path / "nothing"), "00000000-0000-4000-8000-000000000000"
    )
    assert status == 2
    assert f"there is no library in {tmp_path / 'nothing'}" in err
    assert not (tmp_path / "nothing").exists()


async def test_a_node_on_a_shared_library_answers_404_at_once(
    library: Library, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    nodes = [await library.start_node(tmp_path / name, "--http-processes", "1") for name in "ab"]
    image_id = await upload_with_thumbnail(session, nodes[0])
    assert await statuses(nodes[1], image_id) == {200}
    status, out, err = await run_command(
        "delete", *library.flags(), image_id, "--reason", "takedown", env=library.env()
    )
    assert status == 0, err
    assert out == f"{image_id}: deleted\n"
    for node in nodes:
        assert await statuses(node, image_id) == {404}
    assert not [key for key in await library.object_keys() if image_id in key]


async def test_an_index_held_by_another_writer_leaves_the_image_and_says_why(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    storage = tmp_path / "storage"
    async with running(storage) as server:
        image_id = await upload_with_thumbnail(session, server)
    writer = sqlite3.connect(storage / INDEX_FILE, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # as a process that keeps writing would
        status, out, err = await run_command(
            "delete", "--storage", str(storage), "--dependency-timeout", "0.5", image_id
        )
    finally:
        writer.close()
    assert status == 1
    assert out.startswith(f"{image_id}: not deleted: SQLite is unavailable")
    assert "Traceback" not in err
    async with running(storage) as server:
        assert await statuses(server, image_id) == {200}


@pytest.mark.parametrize(
    ("version", "said"),
    [
        (None, "is an empty index, not a library"),
        (3, "has the index schema of an earlier release (version 3); start this release's"),
        (99, "has index schema version 99, from a later release"),
    ],
)
async def test_an_index_not_of_this_release_is_neither_made_nor_upgraded(
    tmp_path: Path, version: int | None, said: str
) -> None:
    index = tmp_path / INDEX_FILE
    index.touch()
    if version is not None:
        with contextlib.closing(sqlite3.connect(index)) as db:
            db.execute(f"PRAGMA user_version = {version}")
    before = index.read_bytes()
    status, _, err = await run_command(
        "delete", "--storage", str(tmp_path), "00000000-0000-4000-8000-000000000000"
    )
    assert status == 2
    assert said in err
    assert index.read_bytes() == before
    assert not (tmp_path / "images").exists()
