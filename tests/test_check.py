"""``asgilook-aiohttp check``: the operator verifies the whole library, on a library the
real server made and the test then damaged, through the console script."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from asgilook_aiohttp.storage.backends import INDEX_FILE

import samples
from checks import image_file, index_rows, until
from cluster import Library
from serving import CONSOLE_SCRIPT, Server, run_command, running

PNG = samples.encode(samples.two_tone((640, 480)), "PNG")


async def upload(session: aiohttp.ClientSession, server: Server) -> dict[str, Any]:
    """An image, and its first thumbnail made."""
    async with session.post(f"{server.url}/images", data=PNG) as response:
        assert response.status == 201
        created: dict[str, Any] = await response.json()
    async with session.get(f"{server.url}{created['thumbnails'][0]}") as response:
        assert response.status == 200
    return created


async def build(storage: Path, count: int) -> list[str]:
    async with aiohttp.ClientSession() as session, running(storage) as server:
        return [(await upload(session, server))["id"] for _ in range(count)]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A library of three images with a thumbnail each, made once by the server."""
    storage = tmp_path_factory.mktemp("made") / "storage"
    return storage, asyncio.run(build(storage, 3))


@pytest.fixture
def embedded(made: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of it of the test's own, to damage."""
    storage, ids = made
    shutil.copytree(storage, tmp_path / "storage")
    return tmp_path / "storage", ids


async def check(storage: Path, *flags: str) -> tuple[int, list[str]]:
    status, out, err = await run_command("check", "--storage", str(storage), *flags)
    assert status in (0, 1), err
    return status, out.splitlines()


def query(storage: Path, sql: str) -> tuple[Any, ...]:
    db = sqlite3.connect(storage / INDEX_FILE)
    try:
        row: tuple[Any, ...] = db.execute(sql).fetchone()
    finally:
        db.close()
    return row


def thumbnail_file(storage: Path, image_id: str) -> Path:
    (found,) = (storage / "thumbnails" / image_id[:2] / image_id[2:4] / image_id).iterdir()
    return found


def blob_name(path: Path, storage: Path) -> str:
    return str(path.relative_to(storage))


def blob_files(storage: Path) -> list[str]:
    return sorted(
        blob_name(path, storage)
        for top in ("images", "thumbnails")
        for path in (storage / top).rglob("*")
        if path.is_file()
    )


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


async def test_a_healthy_library_exits_0(embedded: tuple[Path, list[str]]) -> None:
    storage, _ = embedded
    status, lines = await check(storage)
    assert status == 0
    assert len(lines) == 1
    assert lines[0].startswith(f"checked the library in {storage}: 3 images, 3 thumbnails, ")
    assert lines[0].endswith("; no problems")

    status, out, _ = await run_command("check", "--storage", str(storage), "--json")
    assert status == 0
    document = json.loads(out)
    assert document["library"] == f"the library in {storage}"
    assert document["checked"]["images"] == 3
    assert document["checked"]["thumbnails"] == 3
    assert document["checked"]["blobs"] == 6
    sizes = [path.stat().st_size for path in storage.glob("*s/*/*/**/*.jpeg")]
    assert document["checked"]["bytes"] == sum(sizes)
    assert document["problems"] == document["repaired"] == []
    assert document["set_aside"] == document["set_aside_earlier"] == 0


async def test_what_was_set_aside_earlier_is_counted_and_no_problem(
    embedded: tuple[Path, list[str]],
) -> None:
    storage, _ = embedded
    (storage / "set-aside").mkdir()
    for name in (f"{uuid.uuid4()}.jpeg", f"{uuid.uuid4()}.jpeg"):
        (storage / "set-aside" / name).write_bytes(b"an image set aside")
    status, lines = await check(storage)
    assert status == 0
    assert lines[-1].endswith("; no problems; 2 files in set-aside/ from earlier repairs")
    status, out, _ = await run_command("check", "--storage", str(storage), "--json")
    assert status == 0
    document = json.loads(out)
    assert document["checked"]["blobs"] == 6
    assert (document["set_aside"], document["set_aside_earlier"]) == (0, 2)


def damage(storage: Path, ids: list[str], dead_pid: int) -> dict[str, str]:
    """Every kind of damage but the index's own; the lines each one is reported by."""
    missing, altered, grown = ids
    image_file(storage, missing).unlink()
    altered_file = image_file(storage, altered)
    data = bytearray(altered_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered_file.write_bytes(data)
    grown_file = image_file(storage, grown)
    grown_file.write_bytes(grown_file.read_bytes() + b"more")
    lost_thumbnail = thumbnail_file(storage, altered)
    lost_thumbnail.unlink()

    unnamed_image = image_file(storage, str(uuid.uuid4()))
    unnamed_image.parent.mkdir(parents=True, exist_ok=True)
    unnamed_image.write_bytes(b"an image no record names")
    unnamed_thumbnail = thumbnail_file(storage, grown).with_name("7x7.jpeg")
    unnamed_thumbnail.write_bytes(b"a thumbnail no record names")
    (storage / "images/notes.txt").write_text("the operator's")
    (storage / f"staging/{dead_pid}-0-0.upload").write_bytes(b"half an upload")
    undone = str(uuid.uuid4())  # an upload whose node stopped before its record
    image_file(storage, undone).parent.mkdir(parents=True, exist_ok=True)
    image_file(storage, undone).write_bytes(b"an upload never finished")
    with sqlite3.connect(storage / INDEX_FILE) as db:
        db.execute("INSERT INTO pending (id, owner, expires) VALUES (?, 'gone', 1)", (undone,))
        rows = dict(db.execute("SELECT id, sha256 FROM images"))
        (size,) = db.execute("SELECT bytes FROM images WHERE id = ?", (grown,)).fetchone()
    db.close()
    thumbnail = lost_thumbnail.stem
    return {
        "missing": f"image {missing}: its blob images/{missing}.jpeg is missing",
        "wrong-sha256": f"image {altered}: its blob's SHA-256 is "
        f"{hashlib.sha256(data).hexdigest()}, the record says {rows[altered]}",
        "wrong-size": f"image {grown}: its blob holds {size + 4} bytes, the record says {size}",
        "thumbnail": f"thumbnail {thumbnail} of image {altered}: its blob "
        f"thumbnails/{altered}/{thumbnail}.jpeg is missing",
        "unnamed-image": f"{blob_name(unnamed_image, storage)}: no record names this blob",
        "unnamed-thumbnail": f"{blob_name(unnamed_thumbnail, storage)}: no record names this blob",
        "stray": "images/notes.txt: not a blob of this library: no key names it",
        "staging": f"staging/{dead_pid}-0-0.upload: left by a process that is gone",
        "expired": f"journal entry {undone}: work journaled by node gone whose lease expired ",
    }


# What a repair removes: thumbnails' blobs no record names, and a process's leftover.
REMOVED = ("unnamed-thumbnail", "staging")


def set_aside(expected: dict[str, str]) -> tuple[str, str]:
    """The unnamed image's blob, and where a repair sets it aside."""
    name = subject(expected["unnamed-image"])
    return name, f"set-aside/{Path(name).name}"


def subject(line: str) -> str:
    return line.partition(": ")[0]


def reported(lines: list[str], expected: str) -> bool:
    return any(line.startswith(expected) for line in lines)


async def test_each_kind_of_damage_is_reported_and_repair_leaves_what_users_own(
    embedded: tuple[Path, list[str]], dead_pid: int
) -> None:
    storage, ids = embedded
    expected = damage(storage, ids, dead_pid)
    status, lines = await check(storage)
    assert status == 1
    for line in expected.values():
        assert reported(lines, line), (line, lines)
    assert len(lines) == len(expected) + 1
    assert lines[-1].endswith(f"; {len(expected)} problems")
    kept = blob_files(storage)
    unnamed, aside = set_aside(expected)
    unnamed_bytes = (storage / unnamed).read_bytes()

    status, lines = await check(storage, "--repair")
    assert status == 1
    repaired = [line for line in lines if line.startswith("repaired: ")]
    assert sorted(repaired) == sorted(
        [
            *(f"repaired: {subject(expected[kind])}: removed" for kind in REMOVED),
            f"repaired: {unnamed}: no record names this blob: moved to {aside}",
            f"repaired: {subject(expected['expired'])}: taken over and undone",
            f"repaired: {subject(expected['thumbnail'])}: its record and blob removed: made "
            "again when next asked for",
        ]
    )
    assert lines[-1].endswith(f"; {len(expected)} problems, 5 repaired (1 moved to set-aside/)")
    # The image no record names is set aside whole, not removed; the thumbnail is removed.
    assert (storage / aside).read_bytes() == unnamed_bytes
    assert not (storage / unnamed).exists()
    assert not (storage / subject(expected["unnamed-thumbnail"])).exists()
    assert query(storage, "SELECT count(*) FROM pending") == (0,)

    status, lines = await check(storage)
    assert status == 1
    unrepairable = ["missing", "wrong-sha256", "wrong-size", "stray"]
    assert sorted(lines[:-1]) == sorted(expected[kind] for kind in unrepairable)
    assert ": 3 images, 2 thumbnails, " in lines[-1]
    assert lines[-1].endswith("; 1 file in set-aside/ from earlier repairs")
    # The image records, and every file one names, damaged or not, are there still.
    assert index_rows(storage) == (3, 0)
    removed = {subject(expected[kind]) for kind in ("unnamed-image", "unnamed-thumbnail")}
    undone = subject(expected["expired"]).removeprefix("journal entry ")
    left = [name for name in kept if name not in removed and undone not in name]
    assert blob_files(storage) == left
    assert list((storage / "staging").iterdir()) == []

    # The thumbnail is made again when asked for.
    _, size, _, _, image_id = subject(expected["thumbnail"]).split()
    async with aiohttp.ClientSession() as session, running(storage) as server:
        url = f"{server.url}/thumbnails/{image_id}/{size}.jpeg"
        async with session.get(url) as response:
            assert response.status == 200
    status, lines = await check(storage)
    assert ": 3 images, 3 thumbnails, " in lines[-1]
    assert sorted(lines[:-1]) == sorted(expected[kind] for kind in unrepairable)


async def test_repair_as_json(embedded: tuple[Path, list[str]], dead_pid: int) -> None:
    storage, ids = embedded
    expected = damage(storage, ids, dead_pid)
    status, out, _ = await run_command("check", "--storage", str(storage), "--repair", "--json")
    assert status == 1
    document = json.loads(out)
    kinds = sorted(problem["kind"] for problem in document["problems"])
    assert kinds == sorted(
        [
            "missing",
            "missing",
            "wrong-sha256",
            "wrong-size",
            "unnamed-blob",
            "unnamed-blob",
            "stray",
            "staging-leftover",
            "expired-work",
        ]
    )
    (missing,) = [p for p in document["problems"] if p["key"] == f"image {ids[0]}"]
    assert missing == {
        "kind": "missing",
        "key": f"image {ids[0]}",
        "id": ids[0],
        "detail": expected["missing"].partition(": ")[2],
    }
    unnamed, aside = set_aside(expected)
    assert sorted(done["detail"] for done in document["repaired"]) == [
        "its record and blob removed: made again when next asked for",
        f"no record names this blob: moved to {aside}",
        "removed",
        "removed",
        "taken over and undone",
    ]
    (moved,) = [done for done in document["repaired"] if done["key"] == unnamed]
    assert moved["kind"] == "unnamed-blob"
    assert moved["id"] == Path(aside).stem
    assert (document["set_aside"], document["set_aside_earlier"]) == (1, 0)
    assert document["seconds"] >= 0


async def test_an_image_that_cannot_be_set_aside_is_left(
    embedded: tuple[Path, list[str]],
) -> None:
    storage, _ = embedded
    (storage / "set-aside").write_bytes(b"not a directory")
    unnamed = image_file(storage, str(uuid.uuid4()))
    unnamed.parent.mkdir(parents=True, exist_ok=True)
    unnamed.write_bytes(b"an image no record names")
    status, lines = await check(storage, "--repair")
    assert status == 1
    name = blob_name(unnamed, storage)
    assert lines[:-1] == [
        f"{name}: no record names this blob",
        f"repaired: {name}: left: it could not be set aside: Not a directory",
    ]
    assert unnamed.read_bytes() == b"an image no record names"
    assert query(storage, "SELECT count(*) FROM pending") == (0,)


async def check_without_privilege(storage: Path, *flags: str) -> tuple[int, list[str]]:
    """``check`` run as root without the capabilities that pass over files' permissions:
    what it cannot read, it cannot read, as on a failing disk."""
    process = await asyncio.create_subprocess_exec(
        "setpriv",
        "--bounding-set=-dac_override,-dac_read_search",
        CONSOLE_SCRIPT,
        "check",
        "--storage",
        str(storage),
        *flags,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode in (0, 1), err.decode()
    return process.returncode, out.decode().splitlines()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv, to check without the capabilities that pass over "
    "files' permissions",
)
async def test_what_cannot_be_read_is_reported_and_the_check_goes_on(
    embedded: tuple[Path, list[str]],
) -> None:
    storage, ids = embedded
    unreadable, unlisted, readable = ids
    image_file(storage, unreadable).chmod(0)
    size = thumbnail_file(storage, unlisted).stem
    thumbnails = thumbnail_file(storage, unlisted).parent
    thumbnails.chmod(0)
    unnamed = thumbnail_file(storage, readable).with_name("7x7.jpeg")
    unnamed.write_bytes(b"a thumbnail no record names")
    unnamed.chmod(0)
    expected = sorted(
        [
            f"image {unreadable}: its blob images/{unreadable}.jpeg cannot be read: "
            "Permission denied",
            f"{blob_name(thumbnails, storage)}: cannot be listed: Permission denied",
            f"thumbnail {size} of image {unlisted}: its blob "
            f"thumbnails/{unlisted}/{size}.jpeg cannot be read: Permission denied",
            f"{blob_name(unnamed, storage)}: no record names this blob, and it cannot be "
            "read: Permission denied",
        ]
    )
    status, lines = await check_without_privilege(storage)
    assert status == 1
    assert sorted(lines[:-1]) == expected
    assert ": 3 images, 3 thumbnails, 6 blobs stored, " in lines[-1]
    assert lines[-1].endswith("; 4 problems")

    # A repair leaves them all as they are.
    status, lines = await check_without_privilege(storage, "--repair")
    assert status == 1
    assert sorted(lines[:-1]) == expected
    assert lines[-1].endswith("; 4 problems")
    _, lines = await check_without_privilege(storage, "--repair", "--json")
    document = json.loads("\n".join(lines))
    assert {problem["kind"] for problem in document["problems"]} == {"unreadable"}
    ids_of = [problem["id"] for problem in document["problems"]]
    assert len(ids_of) == 4
    assert set(ids_of) == {None, unreadable, unlisted, readable}
    assert document["repaired"] == []
    thumbnails.chmod(0o755)
    assert index_rows(storage) == (3, 0)
    assert query(storage, "SELECT count(*) FROM thumbnails") == (3,)
    assert len(blob_files(storage)) == 7


async def test_a_damaged_index_is_reported(embedded: tuple[Path, list[str]]) -> None:
    storage, ids = embedded
    with sqlite3.connect(storage / INDEX_FILE) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("UPDATE totals SET images = 4")
        (page,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_images_1'"
        ).fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    # One image's id, as its id index holds it, made another's.
    content = bytearray((storage / INDEX_FILE).read_bytes())
    at = content.index(ids[1].encode(), (page - 1) * page_size)
    content[at : at + 8] = b"ffffffff"
    (storage / INDEX_FILE).write_bytes(content)

    status, lines = await check(storage)
    assert status == 1
    assert reported(lines, "the index (SQLite): SQLite's integrity check: ")
    assert reported(lines, "the index (SQLite): the totals say 4 images of ")

    # A damaged index may miss records: nothing it calls left over is removed.
    unnamed = image_file(storage, str(uuid.uuid4()))
    unnamed.parent.mkdir(parents=True, exist_ok=True)
    unnamed.write_bytes(b"an image no record names")
    status, lines = await check(storage, "--repair")
    assert status == 1
    assert reported(lines, f"{blob_name(unnamed, storage)}: no record names this blob")
    assert not reported(lines, "repaired: ")
    assert lines[-1].endswith("; the index failed its own check, so nothing was repaired")
    assert unnamed.exists()

    # Its images' table unreadable: the check says so, and what it could not do.
    (root,) = query(storage, "SELECT rootpage FROM sqlite_master WHERE name = 'images'")
    content = bytearray((storage / INDEX_FILE).read_bytes())
    content[(root - 1) * page_size : (root - 1) * page_size + 16] = b"\xff" * 16
    (storage / INDEX_FILE).write_bytes(content)
    status, lines = await check(storage)
    assert status == 1
    assert lines[:-1] == [
        "the index (SQLite): SQLite cannot read the index through: "
        "database disk image is malformed",
        "the index (SQLite): the check could not go on: database disk image is malformed",
    ]


async def test_a_library_that_cannot_be_opened_cannot_be_checked(tmp_path: Path) -> None:
    status, _, err = await run_command("check", "--storage", str(tmp_path / "nothing"))
    assert status == 2
    assert f"there is no library in {tmp_path / 'nothing'}" in err
    (tmp_path / INDEX_FILE).write_bytes(b"not a database, not even its header")
    status, out, err = await run_command("check", "--storage", str(tmp_path), "--json")
    assert status == 2
    assert out == ""
    assert err == (
        f"asgilook-aiohttp check: cannot open the library in {tmp_path}: file is not a database\n"
    )


async def test_a_thumbnail_made_again_while_the_records_are_read_is_not_unnamed(
    embedded: tuple[Path, list[str]],
) -> None:
    """Its blob listed, its record passed while it was evicted, and made again before the
    journal is read again: no journal entry, nor the record read, covers it."""
    storage, ids = embedded
    paused, remade = ids[:2]
    with sqlite3.connect(storage / INDEX_FILE) as db:
        row = db.execute("SELECT * FROM thumbnails WHERE image_id = ?", (remade,)).fetchone()
        db.execute("DELETE FROM thumbnails WHERE image_id = ?", (remade,))
        db.execute("UPDATE totals SET thumbnail_bytes = thumbnail_bytes - ?", (row[3],))
    db.close()
    # An image's blob a FIFO: reading it waits, after the thumbnails' records are read,
    # until the test opens it.
    fifo = image_file(storage, paused)
    fifo.unlink()
    os.mkfifo(fifo)
    checking = asyncio.create_task(check(storage))
    # Past the records by then, and waiting on the FIFO (were it not yet, the record would
    # be read, and the test pass without showing anything).
    await asyncio.sleep(2)
    with sqlite3.connect(storage / INDEX_FILE) as db:
        db.execute("INSERT INTO thumbnails VALUES (?, ?, ?, ?, ?, ?)", row)
        db.execute("UPDATE totals SET thumbnail_bytes = thumbnail_bytes + ?", (row[3],))
    db.close()
    await until(lambda: opened_for_writing(fifo))
    status, lines = await checking
    assert status == 1
    # The FIFO is a problem of its own; the thumbnail none.
    assert [line.partition(": ")[0] for line in lines[:-1]] == [f"image {paused}"]


def opened_for_writing(fifo: Path) -> bool:
    """Whether a reader was waiting on ``fifo``, now let go with nothing to read."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as error:
        if error.errno != errno.ENXIO:  # no reader yet
            raise
        return False
    return True


async def test_a_check_while_the_server_works_finds_nothing_wrong(
    embedded: tuple[Path, list[str]],
) -> None:
    storage, _ = embedded
    async with aiohttp.ClientSession() as session, running(storage) as server:
        stop = asyncio.Event()

        async def work() -> int:
            done = 0
            while not stop.is_set():
                created = await upload(session, server)
                async with session.delete(
                    f"{server.url}/images/{created['id']}",
                    headers={"Authorization": f"Bearer {created['delete_token']}"},
                ) as response:
                    assert response.status == 204
                await upload(session, server)
                done += 1
            return done

        working = [asyncio.create_task(work()) for _ in range(3)]
        try:
            for _ in range(3):
                status, lines = await check(storage)
                assert status == 0, lines
        finally:
            stop.set()
            rounds = await asyncio.gather(*working)
        assert sum(rounds) >= 3


async def test_a_shared_library_is_checked_through_postgresql_and_the_object_store(
    library: Library, tmp_path: Path
) -> None:
    node = await library.start_node(tmp_path / "node", "--http-processes", "1")
    async with aiohttp.ClientSession() as session:
        ids = [(await upload(session, node))["id"] for _ in range(2)]
    flags = ("--storage", str(tmp_path / "operator"), *library.flags())
    status, out, err = await run_command("check", *flags, env=library.env())
    assert status == 0, err
    assert out.startswith(f"checked the index at {library.index} with the blobs in ")
    assert ": 2 images, 2 thumbnails, 4 blobs stored, " in out

    unnamed_id = str(uuid.uuid4())
    unnamed = f"images/{unnamed_id}.jpeg"
    unnamed_thumbnail = f"thumbnails/{ids[1]}/7x7.jpeg"
    earlier = f"set-aside/{unnamed_id}.jpeg"  # set aside before: not replaced
    async with library.seaweedfs.client() as s3:
        for name, body in [
            (unnamed, b"the only copy"),
            (unnamed_thumbnail, b"??"),
            ("notes.txt", b"??"),
            (earlier, b"set aside before"),
        ]:
            await s3.put_object(Bucket=library.bucket, Key=f"library/{name}", Body=body)
        await s3.delete_object(Bucket=library.bucket, Key=f"library/images/{ids[0]}.jpeg")
    expected = [
        f"image {ids[0]}: its blob images/{ids[0]}.jpeg is missing",
        "notes.txt: not a blob of this library: no key names it",
        f"{unnamed}: no record names this blob",
        f"{unnamed_thumbnail}: no record names this blob",
    ]
    status, out, err = await run_command("check", *flags, env=library.env())
    assert status == 1, err
    assert sorted(out.splitlines()[:-1]) == sorted(expected)
    assert out.splitlines()[-1].endswith("; 1 file in set-aside/ from earlier repairs")

    status, out, err = await run_command("check", "--repair", *flags, env=library.env())
    assert status == 1, err
    aside = f"set-aside/{unnamed_id}.1.jpeg"
    assert f"repaired: {unnamed}: no record names this blob: moved to {aside}" in out.splitlines()
    assert f"repaired: {unnamed_thumbnail}: removed" in out.splitlines()
    keys = await library.object_keys()
    assert unnamed not in keys
    assert unnamed_thumbnail not in keys
    async with library.seaweedfs.client() as s3:
        for name, body in [(aside, b"the only copy"), (earlier, b"set aside before")]:
            response = await s3.get_object(Bucket=library.bucket, Key=f"library/{name}")
            async with response["Body"] as stored:
                assert await stored.read() == body
    status, out, err = await run_command("check", *flags, env=library.env())
    assert sorted(out.splitlines()[:-1]) == sorted(expected[:2])
    assert out.splitlines()[-1].endswith("; 2 files in set-aside/ from earlier repairs")

    elsewhere = [*flags, "--blobs", "s3://no-such-bucket/library"]
    status, out, err = await run_command("check", *elsewhere, env=library.env())
    assert status == 2
    assert "asgilook-aiohttp check: cannot open the index at " in err
    assert "there is no bucket 'no-such-bucket'" in err
