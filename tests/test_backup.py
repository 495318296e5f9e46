"""``backup`` copies a library while it serves, into a storage directory a server starts
on; ``restore`` copies one into an empty storage."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import re
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from asgilook_aiohttp.storage.backends import INDEX_FILE, RESERVE_FILE
from asgilook_aiohttp.storage.sqlite import SqliteIndex

import samples
from checks import image_file, stored_files, until
from serving import run_command, running, start_command


async def back_up(storage: Path, destination: Path) -> str:
    status, out, err = await run_command("backup", "--storage", storage, destination)
    assert status == 0, err
    return out


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    return samples.encode(samples.photo(size, seed), "JPEG", quality=90)


async def upload(
    session: aiohttp.ClientSession, url: str, seed: int, size: tuple[int, int] = (96, 64)
) -> dict[str, Any]:
    async with session.post(f"{url}/images", data=io.BytesIO(jpeg(seed, size))) as response:
        assert response.status == 201, await response.text()
        image: dict[str, Any] = await response.json()
        return image


async def served(session: aiohttp.ClientSession, url: str, image_id: str) -> bytes:
    async with session.get(f"{url}/images/{image_id}.jpeg") as response:
        assert response.status == 200, (image_id, response.status)
        return await response.read()


def assert_every_row_has_its_file_and_nothing_else(storage: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(storage / INDEX_FILE)) as db:
        ids = [image_id for (image_id,) in db.execute("SELECT id FROM images")]
        assert db.execute("SELECT count(*) FROM pending").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM thumbnails").fetchone() == (0,)
        totals = db.execute("SELECT images, image_bytes, thumbnail_bytes FROM totals").fetchone()
        counted = db.execute("SELECT count(*), sum(bytes), 0 FROM images").fetchone()
    assert totals == counted
    expected = {str(image_file(storage, image_id).relative_to(storage)) for image_id in ids}
    assert set(stored_files(storage)) == expected
    return ids


def summary(out: str) -> dict[str, int]:
    """The counts in the summary line: images, copied, already there, removed."""
    match = re.fullmatch(
        r"backed up ([\d,]+) images \(.* MB\) to .*: ([\d,]+) copied \(.* MB\), "
        r"([\d,]+) already there, ([\d,]+) removed, in [\d.]+ s\n",
        out,
    )
    assert match, out
    images, copied, there, removed = (int(n.replace(",", "")) for n in match.groups())
    return {"images": images, "copied": copied, "there": there, "removed": removed}


async def test_a_backup_taken_during_a_storm_of_uploads_serves_what_was_acknowledged_before(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    source, backup = tmp_path / "storage", tmp_path / "backup"
    acknowledged: list[tuple[float, str]] = []
    storming = True
    under_way = asyncio.Event()

    async with running(source, "--http-processes", "2") as server:

        async def uploader(number: int) -> None:
            seed = number * 10_000
            while storming:
                seed += 1
                image = await upload(session, server.url, seed)
                acknowledged.append((time.monotonic(), image["id"]))
                if len(acknowledged) >= 30:
                    under_way.set()

        uploaders = [asyncio.create_task(uploader(n)) for n in range(4)]
        await under_way.wait()
        began = time.monotonic()
        out = await back_up(source, backup)
        during = [image_id for at, image_id in acknowledged if at > began]
        storming = False
        await asyncio.gather(*uploaders)
        before = [image_id for at, image_id in acknowledged if at < began]
        originals = {image_id: await served(session, server.url, image_id) for image_id in before}

    assert during, "no upload was acknowledged while the backup ran"
    counts = summary(out)
    assert counts["copied"] == counts["images"] >= len(before)
    assert set(before) <= set(assert_every_row_has_its_file_and_nothing_else(backup))
    async with running(backup) as copy:
        for image_id, data in originals.items():
            assert await served(session, copy.url, image_id) == data


async def test_a_second_backup_copies_only_what_is_new_and_removes_what_was_deleted(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    source, backup = tmp_path / "storage", tmp_path / "backup"
    async with running(source) as server:
        first = [await upload(session, server.url, seed) for seed in range(5)]
        assert summary(await back_up(source, backup)) == {
            "images": 5,
            "copied": 5,
            "there": 0,
            "removed": 0,
        }
        kept = [image_file(backup, image["id"]) for image in first[1:]]
        before = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in kept]

        new = [await upload(session, server.url, seed) for seed in range(5, 8)]
        gone = first[0]
        headers = {"Authorization": f"Bearer {gone['delete_token']}"}
        async with session.delete(f"{server.url}/images/{gone['id']}", headers=headers) as deleted:
            assert deleted.status == 204
        assert summary(await back_up(source, backup)) == {
            "images": 7,
            "copied": 3,
            "there": 4,
            "removed": 1,
        }
        async with running(backup) as copy:
            for image in new:
                assert await served(session, copy.url, image["id"]) == await served(
                    session, server.url, image["id"]
                )
            status, _, err = await run_command("backup", "--storage", source, backup)
            assert status == 2
            assert f"a server is running on {backup}" in err

    assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in kept] == before
    assert not image_file(backup, gone["id"]).exists()
    assert len(assert_every_row_has_its_file_and_nothing_else(backup)) == 7


async def test_restore_into_an_empty_storage_and_only_there(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    source, backup, restored = tmp_path / "storage", tmp_path / "backup", tmp_path / "restored"
    async with running(source) as server:
        image = await upload(session, server.url, 1, (640, 360))
        await thumbnail(session, server.url, image)
        original = await served(session, server.url, image["id"])
    await back_up(source, backup)
    restored.mkdir()

    status, out, err = await run_command("restore", "--storage", restored, backup)
    assert status == 0, err
    assert re.fullmatch(
        rf"restored 1 images \([\d.]+ MB\) from {backup} into {restored}: 1 copied .*\n", out
    )
    assert_every_row_has_its_file_and_nothing_else(restored)
    async with running(restored) as copy:
        assert await served(session, copy.url, image["id"]) == original
        await thumbnail(session, copy.url, image)  # made again, on demand

    status, _, err = await run_command("restore", "--storage", source, backup)
    assert status == 2
    assert f"{source} is not empty" in err

    # What a restore interrupted before its index was written leaves, the next one from
    # the same backup keeps; what it did not mark as its own, no restore touches.
    shutil.rmtree(restored)
    restored.mkdir()
    (restored / "staging").mkdir()
    copy_path = image_file(restored, image["id"])
    copy_path.parent.mkdir(parents=True)
    shutil.copy(image_file(backup, image["id"]), copy_path)
    only_copy = image_file(restored, str(uuid.uuid4()))
    only_copy.parent.mkdir(parents=True, exist_ok=True)
    only_copy.write_bytes(b"someone's only copy")
    status, out, err = await run_command("restore", "--storage", restored, backup)
    assert (status, out) == (2, "")
    assert f"{restored} is not empty" in err
    marker = restored / f"{INDEX_FILE}-copying"
    marker.write_text(f"restore from {source}\n")
    status, out, err = await run_command("restore", "--storage", restored, backup)
    assert (status, out) == (2, "")
    assert f"{restored} holds an interrupted copy that is not this one" in err
    assert only_copy.exists()

    only_copy.unlink()
    marker.write_text(f"restore from {backup}\n")
    status, out, err = await run_command("restore", "--storage", restored, backup)
    assert status == 0, err
    assert ": 0 copied (0.0 MB), 1 already there, 0 removed" in out
    assert not marker.exists()


async def test_a_file_lost_or_not_what_its_row_says_is_left_out_and_named(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    source, backup = tmp_path / "storage", tmp_path / "backup"
    async with running(source) as server:
        good, damaged, lost = [await upload(session, server.url, seed) for seed in range(3)]
        kept = await served(session, server.url, good["id"])
    path = image_file(source, damaged["id"])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(data)
    image_file(source, lost["id"]).unlink()

    status, out, err = await run_command("backup", "--storage", source, backup)
    assert status == 1
    assert re.fullmatch(
        r"backed up 1 images .*: 1 copied .*, 0 removed, 2 left out \(run check\), in .*\n", out
    )
    assert f"{damaged['id']}: {path} is not what its row says" in err
    assert f"{lost['id']}: " in err
    assert "is missing, while the library still has its row" in err
    assert assert_every_row_has_its_file_and_nothing_else(backup) == [good["id"]]
    async with running(backup) as copy:
        assert await served(session, copy.url, good["id"]) == kept
        async with session.get(f"{copy.url}/images/{damaged['id']}.jpeg") as response:
            assert response.status == 404


def library_of(storage: Path, count: int, first: int = 0) -> None:
    """A library of ``count`` images written directly, as a server would have left it; the
    ids are made of the numbers from ``first`` on."""
    storage.mkdir()
    asyncio.run(create_index(storage))
    data = jpeg(0, (32, 24))
    rows = []
    for number in range(count):
        image_id = str(uuid.UUID(int=first + number, version=4))
        path = image_file(storage, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append((image_id, number, 32, 24, len(data), hashlib.sha256(data).hexdigest()))
    with contextlib.closing(sqlite3.connect(storage / INDEX_FILE)) as db, db:
        db.executemany(
            "INSERT INTO images (id, uploaded, width, height, bytes, sha256) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute("UPDATE totals SET images = ?, image_bytes = ?", (count, count * len(data)))


async def create_index(storage: Path) -> None:
    index = SqliteIndex(storage / INDEX_FILE, storage / RESERVE_FILE)
    await index.open()
    await index.close()


async def test_an_interrupted_backup_leaves_no_index_and_the_next_one_resumes(
    tmp_path: Path,
) -> None:
    source, backup = tmp_path / "storage", tmp_path / "backup"
    await asyncio.to_thread(library_of, source, 3000)
    process = await start_command("backup", "--storage", source, backup)
    await until((backup / "images").exists)
    process.send_signal(signal.SIGINT)
    out, _ = await process.communicate()
    assert (process.returncode, out) == (130, b"")
    assert sorted(path.name for path in backup.iterdir()) == [
        "images",
        f"{INDEX_FILE}-copying",
        "staging",
    ]
    assert not any((backup / "staging").iterdir())
    kept = len(stored_files(backup))

    counts = summary(await back_up(source, backup))
    assert counts == {"images": 3000, "copied": 3000 - kept, "there": kept, "removed": 0}
    assert len(assert_every_row_has_its_file_and_nothing_else(backup)) == 3000


async def thumbnail(session: aiohttp.ClientSession, url: str, image: dict[str, Any]) -> None:
    async with session.get(f"{url}{image['thumbnails'][0]}") as response:
        assert response.status == 200


async def test_what_is_not_a_library_or_not_embedded_is_refused(tmp_path: Path) -> None:
    empty, elsewhere = tmp_path / "empty", tmp_path / "elsewhere"
    empty.mkdir()
    status, out, err = await run_command("backup", "--storage", empty, tmp_path / "backup")
    assert (status, out) == (2, "")
    assert f"there is no library in {empty}" in err

    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not a library")
    async with running(tmp_path / "storage"):
        pass
    status, _, err = await run_command("backup", "--storage", tmp_path / "storage", elsewhere)
    assert status == 2
    assert f"{elsewhere} is not a backup of this library made by backup" in err
    status, _, err = await run_command(
        "backup", "--storage", tmp_path / "storage", tmp_path / "storage" / "backup"
    )
    assert status == 2
    assert "inside the library it would copy" in err

    with contextlib.closing(sqlite3.connect(tmp_path / "storage" / INDEX_FILE)) as db:
        db.execute("PRAGMA user_version = 3")
    status, _, err = await run_command("backup", "--storage", tmp_path / "storage", empty)
    assert status == 2
    assert "has index schema version 3, older than this release's" in err
    assert "start this release's server on it once" in err
    assert not any(empty.iterdir())

    shared = ("--index", "postgresql://asgilook@127.0.0.1:1/asgilook", "--blobs", "s3://bucket")
    for name in ("backup", "restore"):
        status, out, err = await run_command(name, *shared, tmp_path / "backup")
        assert (status, out) == (2, ""), err
        assert "pg_dump" in err
        assert "docs/operating.md" in err


async def test_an_index_held_by_the_server_alone_is_waited_for_then_refused(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    async with running(storage):
        pass
    # As the server holds it on a full disk: exclusive locking mode, and a read done.
    with contextlib.closing(sqlite3.connect(storage / INDEX_FILE)) as held:
        held.execute("PRAGMA locking_mode=EXCLUSIVE")
        held.execute("SELECT count(*) FROM images").fetchone()
        status, _, err = await run_command(
            "backup", "--storage", storage, "--dependency-timeout", "0.2", tmp_path / "backup"
        )
    assert status == 2
    assert "the server holds it to itself while the disk is too full" in err


async def test_only_a_backup_of_this_library_that_no_server_was_started_on_is_updated(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    library, other, backup = tmp_path / "library", tmp_path / "other", tmp_path / "backup"
    await asyncio.to_thread(library_of, library, 2)
    await asyncio.to_thread(library_of, other, 1, 100)
    others = stored_files(other)
    status, out, err = await run_command("backup", "--storage", library, other)
    assert (status, out) == (2, "")
    assert f"{other} is not a backup of this library made by backup" in err
    assert stored_files(other) == others

    await back_up(library, backup)
    assert sorted(path.name for path in backup.glob(f"{INDEX_FILE}-*")) == [
        f"{INDEX_FILE}-backup-of"
    ]
    status, _, err = await run_command("backup", "--storage", other, backup)
    assert status == 2
    assert f"{backup} is not a backup of this library made by backup" in err

    async with running(backup) as server:
        added = await upload(session, server.url, 1)
    status, out, err = await run_command("backup", "--storage", library, backup)
    assert (status, out) == (2, "")
    assert f"a server has been started on {backup}" in err
    assert image_file(backup, added["id"]).exists()


async def test_a_restore_writes_nothing_into_the_backup_which_may_be_read_only(
    tmp_path: Path,
) -> None:
    library, backup, restored = tmp_path / "library", tmp_path / "backup", tmp_path / "restored"
    await asyncio.to_thread(library_of, library, 3)
    await back_up(library, backup)
    # Rollback journal mode, 1 in both format bytes: no -wal nor -shm for a reader to make.
    assert (backup / INDEX_FILE).read_bytes()[18:20] == b"\x01\x01"
    before = sorted(backup.rglob("*"))
    for path in [backup, *before]:  # root writes anyway: hence the listing
        path.chmod(path.stat().st_mode & ~0o222)
    status, _, err = await run_command("restore", "--storage", restored, backup)
    assert status == 0, err
    assert sorted(backup.rglob("*")) == before
    assert len(assert_every_row_has_its_file_and_nothing_else(restored)) == 3


async def test_a_destination_that_cannot_be_written_is_said_in_one_line(tmp_path: Path) -> None:
    library, file = tmp_path / "library", tmp_path / "file"
    await asyncio.to_thread(library_of, library, 1)
    file.write_text("not a directory")
    status, out, err = await run_command("backup", "--storage", library, file / "backup")
    assert (status, out) == (2, "")
    assert re.fullmatch(
        rf"asgilook-aiohttp backup: could not copy into {file / 'backup'}: .*Not a directory.*\n",
        err,
    )


async def test_what_a_repair_set_aside_is_backed_up_too(tmp_path: Path) -> None:
    library, backup = tmp_path / "library", tmp_path / "backup"
    await asyncio.to_thread(library_of, library, 1)
    aside = library / "set-aside"
    aside.mkdir()
    (aside / "a.jpeg").write_bytes(b"a" * 10)
    (aside / "b.jpeg").write_bytes(b"b" * 20)
    assert (
        ": 1 copied (0.0 MB), 0 already there, 0 removed, set-aside/: 2 copied, 0 removed, in "
        in (await back_up(library, backup))
    )
    (aside / "a.jpeg").unlink()
    (aside / "c.jpeg").write_bytes(b"c")
    assert (
        ": 0 copied (0.0 MB), 1 already there, 0 removed, set-aside/: 1 copied, 1 removed, in "
        in (await back_up(library, backup))
    )
    copied = {path.name: path.read_bytes() for path in (backup / "set-aside").iterdir()}
    assert copied == {"b.jpeg": b"b" * 20, "c.jpeg": b"c"}


async def test_a_backup_checked_or_deleted_from_is_still_updated(tmp_path: Path) -> None:
    library, backup = tmp_path / "library", tmp_path / "backup"
    await asyncio.to_thread(library_of, library, 3)
    await back_up(library, backup)
    status, _, err = await run_command("check", "--storage", backup)  # switches it to WAL
    assert status == 0, err
    assert "3 images" in await back_up(library, backup)


async def test_an_original_that_cannot_be_read_is_left_out_and_named(tmp_path: Path) -> None:
    library, backup = tmp_path / "library", tmp_path / "backup"
    await asyncio.to_thread(library_of, library, 2)
    unreadable = sorted((library / "images").rglob("*.jpeg"))[0]
    unreadable.unlink()
    unreadable.mkdir()  # what even root cannot read as a file
    status, out, err = await run_command("backup", "--storage", library, backup)
    assert status == 1
    assert "1 left out (run check)" in out
    assert f"{unreadable} cannot be read" in err
    assert len(assert_every_row_has_its_file_and_nothing_else(backup)) == 1


_STOPPED_MID_WRITE = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 1")
db.execute("BEGIN")
db.execute("UPDATE images SET sha256 = 'not what the file holds'")
db.execute("CREATE TABLE spill (x)")
db.executemany("INSERT INTO spill VALUES (randomblob(4000))", [()] * 500)
os.kill(os.getpid(), 9)
"""


async def test_a_restore_undoes_the_write_a_stopped_backup_left_unfinished(
    tmp_path: Path,
) -> None:
    library, backup, restored = tmp_path / "library", tmp_path / "backup", tmp_path / "restored"
    await asyncio.to_thread(library_of, library, 3)
    await back_up(library, backup)
    stopped = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _STOPPED_MID_WRITE, str(backup / INDEX_FILE)
    )
    assert await stopped.wait() == -signal.SIGKILL
    assert (backup / f"{INDEX_FILE}-journal").stat().st_size > 0
    status, out, err = await run_command("restore", "--storage", restored, backup)
    assert status == 0, err
    assert out.startswith("restored 3 images")
    assert len(assert_every_row_has_its_file_and_nothing_else(restored)) == 3


async def test_a_new_file_systems_root_is_empty_and_a_garbled_marker_no_backup(
    tmp_path: Path,
) -> None:
    library, root = tmp_path / "library", tmp_path / "mounted"
    await asyncio.to_thread(library_of, library, 1)
    (root / "lost+found").mkdir(parents=True)  # as mkfs leaves it
    assert "1 copied" in await back_up(library, root)
    (root / f"{INDEX_FILE}-backup-of").write_bytes(bytes(range(128, 256)))
    status, out, err = await run_command("backup", "--storage", library, root)
    assert (status, out) == (2, "")
    assert f"{root} is not a backup of this library made by backup" in err
