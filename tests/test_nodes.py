"""Two real server processes on one library (a PostgreSQL database and a SeaweedFS bucket)
answer as one server: an upload on one is served, thumbnailed and deleted on the other; a
thumbnail asked of both is made once, and kept thumbnails stay within one budget; paging
stays exact while both upload; a node killed mid-upload or mid-delete leaves nothing that
its lease running out does not set right, nor do thumbnails it was making; a deletion
while the other node streams the image is no server error; a pair of backends that do
not go together, or that cannot be reached, is refused in one line."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import os
import re
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from asgilook_aiohttp.config import MAX_PAGE_SIZE
from asgilook_aiohttp.converter import Converter
from asgilook_aiohttp.imaging import Converted
from asgilook_aiohttp.journal import Journal
from asgilook_aiohttp.storage.ports import Destination, ImageRecord, image_key, thumbnail_key
from asgilook_aiohttp.thumbnails import Thumbnails

import samples
from checks import Metrics, bearer, image_object, scrape, until_metric
from cluster import Library
from serving import ROOT, Server, start_server

if TYPE_CHECKING:
    import asyncpg

# A lease this short lets a test see a dead node's work undone within seconds.
LEASE = ("--lease-seconds", "2")
# An access log line of a request answered with a 5xx.
_SERVER_ERROR = re.compile(r'" 5\d\d \d+B ')

Response = tuple[int, CIMultiDictProxy[str], bytes]


class Nodes:
    """Server processes on the test's library, each with a scratch directory and a log
    file of its own. Each node serves with one HTTP process, so that what it journals
    has one owner; several HTTP processes of one server are nodes to each other
    (test_processes.py)."""

    def __init__(self, library: Library, directory: Path) -> None:
        self._library = library
        self._directory = directory

    async def start(self, *names: str, flags: tuple[str, ...] = ()) -> list[Server]:
        """Start a node of each name at once (a name used before: that node restarted)."""
        return list(await asyncio.gather(*(self._start(name, flags) for name in names)))

    async def _start(self, name: str, flags: tuple[str, ...]) -> Server:
        with self.log(name).open("ab") as log:
            return await start_server(
                self._directory / name,
                *self._library.flags(),
                "--http-processes",
                "1",
                *flags,
                env=self._library.env(),
                stderr=log.fileno(),
            )

    def log(self, name: str) -> Path:
        return self._directory / f"{name}.log"

    def assert_no_server_errors(self) -> None:
        """No node logged a traceback or answered a request with a 5xx."""
        for log in self._directory.glob("*.log"):
            text = log.read_text()
            assert "Traceback" not in text, text
            assert not _SERVER_ERROR.search(text), text


@pytest.fixture
def nodes(library: Library, tmp_path: Path) -> Nodes:
    return Nodes(library, tmp_path)


async def upload(session: aiohttp.ClientSession, node: Server, data: bytes) -> dict[str, Any]:
    async with session.post(f"{node.url}/images", data=io.BytesIO(data)) as response:
        assert response.status == 201, await response.text()
        created: dict[str, Any] = await response.json()
        return created


async def fetch(
    session: aiohttp.ClientSession, node: Server, path: str, **headers: str
) -> Response:
    """GET ``path``; header names are given with underscores for dashes."""
    sent = {name.replace("_", "-"): text for name, text in headers.items()}
    async with session.get(f"{node.url}{path}", headers=sent) as response:
        return response.status, response.headers, await response.read()


async def image_bytes(
    session: aiohttp.ClientSession, node: Server, created: dict[str, Any]
) -> bytes:
    """An uploaded image's bytes, as stored."""
    status, _, body = await fetch(session, node, created["image"])
    assert status == 200
    return body


async def delete(session: aiohttp.ClientSession, node: Server, created: dict[str, Any]) -> int:
    headers = bearer(created["delete_token"])
    async with session.delete(f"{node.url}/images/{created['id']}", headers=headers) as response:
        return response.status


async def kill(node: Server) -> None:
    """kill -9 a node with its worker (its process group), as a crash of its host would."""
    os.killpg(node.process.pid, signal.SIGKILL)
    assert await node.exit_code() == -signal.SIGKILL


async def summed(
    session: aiohttp.ClientSession, nodes: Collection[Server], name: str, **labels: str
) -> float:
    """A series summed over the nodes, and over the labels not named."""
    scraped: list[Metrics] = [await scrape((session, node.url)) for node in nodes]
    return sum(
        sample
        for metrics in scraped
        for (series, series_labels), sample in metrics.items()
        if series == name and set(labels.items()) <= set(series_labels)
    )


async def conversions(session: aiohttp.ClientSession, *nodes: Server) -> float:
    """Thumbnails the nodes made, failed or not."""
    return await summed(session, nodes, "asgilook_conversions_total", job="make_thumbnail")


def next_page(response: aiohttp.ClientResponse) -> str | None:
    """The path and query of the page the Link header names next, if any."""
    if "next" not in response.links:
        return None
    url = response.links["next"]["url"]
    assert isinstance(url, URL)
    return url.path_qs


async def pages(
    session: aiohttp.ClientSession, *nodes: Server, limit: int = MAX_PAGE_SIZE
) -> list[tuple[str, bytes]]:
    """The ETag and body of every page a client paging to the end gets, asking the nodes
    in turn."""
    got: list[tuple[str, bytes]] = []
    path: str | None = f"/images?limit={limit}"
    for node in itertools.cycle(nodes):
        if path is None:
            return got
        async with session.get(f"{node.url}{path}") as response:
            assert response.status == 200
            got.append((response.headers["ETag"], await response.read()))
            path = next_page(response)
    raise AssertionError("unreachable")


async def listed(
    session: aiohttp.ClientSession, *nodes: Server, limit: int = MAX_PAGE_SIZE
) -> list[str]:
    """The ids a client paging to the end sees, in order, asking the nodes in turn."""
    return [
        image["id"]
        for _, body in await pages(session, *nodes, limit=limit)
        for image in json.loads(body)
    ]


async def connect(library: Library) -> asyncpg.Connection[asyncpg.Record]:
    import asyncpg  # noqa: PLC0415 - of the extra, whose absence skips these tests first

    return await asyncpg.connect(library.index)


@dataclass(frozen=True)
class Rows:
    """What the index holds, read from its tables."""

    images: set[str]
    """The blob key of every image."""
    thumbnails: set[str]
    """The blob key of every kept thumbnail."""
    journal: dict[str, str]
    """The owner of each journaled key."""


async def rows(library: Library) -> Rows:
    db = await connect(library)
    try:
        images = await db.fetch("SELECT id FROM images")
        thumbnails = await db.fetch("SELECT image_id, width, height FROM thumbnails")
        journal = await db.fetch("SELECT id, owner FROM pending")
    finally:
        await db.close()
    return Rows(
        {image_key(row["id"]) for row in images},
        {thumbnail_key(row["image_id"], row["width"], row["height"]) for row in thumbnails},
        {row["id"]: row["owner"] for row in journal},
    )


async def until_rows(library: Library, wanted: Callable[[Rows], bool]) -> Rows:
    """Wait for the index to hold what is ``wanted``; what it holds then."""
    async with asyncio.timeout(30):
        while not wanted(found := await rows(library)):  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(0.01)
    return found


async def unrecorded(library: Library, owner: str) -> set[str]:
    """Objects in the bucket that no row names, of images ``owner`` journaled."""
    index = await rows(library)
    journaled = {image_key(key) for key, holder in index.journal.items() if holder == owner}
    return (set(await library.object_keys()) - index.images - index.thumbnails) & journaled


async def assert_consistent(library: Library, session: aiohttp.ClientSession, node: Server) -> Rows:
    """Every object in the bucket has its row and every row its object; the images listed
    are those the index holds; the index's totals are its rows'. What it holds."""
    index = await rows(library)
    assert sorted(await library.object_keys()) == sorted(index.images | index.thumbnails)
    assert {image_key(image_id) for image_id in await listed(session, node)} == index.images
    db = await connect(library)
    try:
        totals = await db.fetchrow("SELECT images, image_bytes, thumbnail_bytes FROM totals")
        counted = await db.fetchrow(
            "SELECT count(*), coalesce(sum(bytes), 0), "
            "(SELECT coalesce(sum(bytes), 0) FROM thumbnails) FROM images"
        )
    finally:
        await db.close()
    assert totals is not None
    assert counted is not None
    assert tuple(totals) == tuple(counted)
    return index


async def test_two_nodes_answer_as_one_server(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b")
    created = await upload(session, a, samples.encode(samples.photo((800, 600)), "JPEG"))
    image = image_object(created)
    assert len(image["thumbnails"]) == 3
    # Listed, described and thumbnailed by the other node at once.
    assert (await fetch(session, b, image["thumbnails"][0]))[0] == 200
    for node in (a, b):
        assert await (await session.get(f"{node.url}/images/{image['id']}")).json() == image
        assert await (await session.get(f"{node.url}/images")).json() == [image]

    async with library.seaweedfs.client() as s3:
        for path in (image["image"], image["thumbnails"][0]):
            answers = [await fetch(session, node, path) for node in (a, b)]
            body = answers[0][2]
            assert [(status, got) for status, _, got in answers] == [(200, body)] * 2
            etag = answers[0][1]["ETag"]
            for _, headers, _ in answers:
                assert headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()[:32]}"'
                assert headers["Last-Modified"] == image["modified"]  # the upload's
            # The validators are the index's: not the store's MD5 of the object.
            head = await s3.head_object(Bucket=library.bucket, Key=f"library{path}")
            assert head["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
            assert head["ETag"] != etag
            for node in (a, b):
                status, headers, _ = await fetch(session, node, path, If_None_Match=etag)
                assert (status, headers["ETag"]) == (304, etag)
                status, _, _ = await fetch(session, node, path, If_Modified_Since=image["modified"])
                assert status == 304
                status, _, _ = await fetch(session, node, path, If_Match='"0123456789abcdef"')
                assert status == 412
                status, headers, part = await fetch(session, node, path, Range="bytes=10-109")
                assert (status, part) == (206, body[10:110])
                assert headers["Content-Range"] == f"bytes 10-109/{len(body)}"
                status, headers, _ = await fetch(session, node, path, Range=f"bytes={len(body)}-")
                assert (status, headers["Content-Range"]) == (416, f"bytes */{len(body)}")

    # Every page is the same from either node, whichever node the cursor came from.
    more = [await upload(session, node, samples.small_png()) for node in (a, b, a, b)]
    walked = [await pages(session, a, b, limit=2), await pages(session, b, a, limit=2)]
    assert walked[0] == walked[1]
    assert len(walked[0]) == 3

    # A deletion on one node is a 404 on the other at once, blobs and all.
    assert await delete(session, b, created) == 204
    for path in (f"/images/{image['id']}", image["image"], image["thumbnails"][0]):
        assert (await fetch(session, a, path))[0] == 404
    assert await delete(session, a, more[1]) == 204
    assert (await fetch(session, b, more[1]["image"]))[0] == 404
    assert await listed(session, a) == [more[0]["id"], more[2]["id"], more[3]["id"]]
    await assert_consistent(library, session, b)
    # Each node reads the library's counters again within a second.
    stored = sum([len(await image_bytes(session, a, c)) for c in (more[0], more[2], more[3])])
    for node in (a, b):
        source = (session, node.url)
        await until_metric(source, "asgilook_images_stored", lambda n: n == 3)
        await until_metric(source, "asgilook_image_bytes_stored", lambda n: n == stored)
        await until_metric(source, "asgilook_thumbnail_bytes_stored", lambda n: n == 0)
    nodes.assert_no_server_errors()


async def test_a_thumbnail_asked_of_both_nodes_at_once_is_made_once(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b")
    created = await upload(session, a, samples.slow_png())
    # The largest thumbnail of 12 megapixels: a conversion long enough for every request
    # to arrive while it runs.
    path = created["thumbnails"][0]
    answers = await asyncio.gather(*(fetch(session, node, path) for node in (a, b) * 8))
    assert await conversions(session, a, b) == 1
    _, headers, body = answers[0]
    assert {(status, tags["ETag"], got) for status, tags, got in answers} == {
        (200, headers["ETag"], body)
    }
    assert samples.decode(body).size == (2000, 1500)
    await assert_consistent(library, session, b)
    nodes.assert_no_server_errors()


async def thumbnail(session: aiohttp.ClientSession, node: Server, path: str) -> bytes:
    """A thumbnail's bytes; asked for again, as the 404 says, if it was evicted as it was
    about to be sent (when more is made within a second than the budget holds, the least
    recently used include the freshest, which another node may be about to send)."""
    for _ in range(3):
        status, _, body = await fetch(session, node, path)
        if status != 404 or b"removed as it was about to be sent" not in body:
            break
    assert status == 200, body
    return body


async def test_two_nodes_keep_thumbnails_within_one_budget(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b", flags=("--thumbnail-budget-mb", "1"))
    photos = [samples.encode(samples.photo((1200, 900), seed), "JPEG") for seed in range(16)]
    created = await asyncio.gather(
        *(upload(session, node, photo) for node, photo in zip(itertools.cycle((a, b)), photos))
    )
    # Three thumbnails each, of 6 to 80 kB: 1.7 MB in all. Asked for four at a time
    # of both nodes, which evict what the other made, twice over.
    paths = [path for c in created for path in c["thumbnails"]]
    sizes: dict[str, int] = {}
    for start in [*range(0, len(paths), 4)] * 2:
        batch = paths[start : start + 4]
        got = await asyncio.gather(*(thumbnail(session, node, p) for p in batch for node in (a, b)))
        for path, body, same in zip(batch, got[::2], got[1::2], strict=True):
            assert body == same
            sizes[path] = len(body)
    budget = 1024 * 1024
    assert sum(sizes.values()) > budget, "the test must overflow the budget"
    index = await assert_consistent(library, session, a)
    kept = sum(sizes[f"/{key}"] for key in index.thumbnails)
    # Made at once on the other node, up to three thumbnails may outlast the last eviction.
    assert kept <= budget + 3 * max(sizes.values())
    assert len(index.thumbnails) < len(paths)
    nodes.assert_no_server_errors()


async def test_paging_while_two_nodes_upload_sees_every_image_once(
    nodes: Nodes, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b")
    acknowledged: list[str] = []

    async def keep_uploading(node: Server) -> None:
        for _ in range(25):
            acknowledged.append((await upload(session, node, samples.small_png()))["id"])

    async def keep_paging() -> list[int]:
        """Page from the start to the end again and again while the uploads go on; how
        many images each pass saw."""
        seen: list[list[str]] = [[]]
        while not uploading.done():
            before = set(acknowledged)
            seen.append(await listed(session, a, b, limit=5))
            assert len(seen[-1]) == len(set(seen[-1]))  # none twice in a pass
            assert before <= set(seen[-1])  # every one acknowledged before it began
            assert seen[-1][: len(seen[-2])] == seen[-2]  # in one order, new ones after
        return [len(ids) for ids in seen]

    async def keep_following(first: Server, second: Server) -> list[str]:
        """Page on from the last image seen, as new ones come, until the uploads are over;
        every image seen, in order."""
        seen: list[str] = []
        for node in itertools.cycle((first, second)):
            done = uploading.done()
            after = f"&after={seen[-1]}" if seen else ""
            async with session.get(f"{node.url}/images?limit=5{after}") as response:
                assert response.status == 200
                page = [image["id"] for image in await response.json()]
            seen.extend(page)
            if not page:
                if done:
                    return seen
                await asyncio.sleep(0.005)
        raise AssertionError("unreachable")

    uploading = asyncio.gather(*(keep_uploading(node) for node in (a, b) * 4))
    passes, *followed = await asyncio.gather(
        keep_paging(), keep_following(a, b), keep_following(b, a)
    )
    await uploading
    assert len(acknowledged) == 200
    assert sorted(await listed(session, b, a, limit=5)) == sorted(acknowledged)
    # A client that followed the uploads saw each image once: none passed over because
    # it committed after one that came later in the order.
    for seen in followed:
        assert sorted(seen) == sorted(acknowledged)
    assert any(0 < count < 200 for count in passes)  # passes met the uploads under way
    nodes.assert_no_server_errors()


async def test_a_node_killed_mid_upload_leaves_nothing_once_its_lease_passes(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b", flags=LEASE)
    photo = samples.encode(samples.photo((512, 384)), "JPEG")
    acknowledged = [await upload(session, a, photo)]
    (owner_a,) = set((await rows(library)).journal.values())  # ids A journaled ahead
    acknowledged.append(await upload(session, b, photo))
    for created, node in zip(acknowledged, (b, a), strict=True):
        assert (await fetch(session, node, created["thumbnails"][0]))[0] == 200

    # B's uploads in flight: conversions of 12 megapixels, one after another.
    b_uploads = [asyncio.create_task(upload(session, b, samples.slow_png())) for _ in range(2)]
    await until_metric((session, b.url), "asgilook_conversion_workers_busy", bool)

    # A's: one whose body is arriving, one in the bucket on its way into the index, and
    # one converting.
    async def half_then_nothing() -> AsyncIterator[bytes]:
        yield photo[: len(photo) // 2]
        await asyncio.sleep(3600)

    arriving = asyncio.create_task(session.post(f"{a.url}/images", data=half_then_nothing()))
    await until_metric(
        (session, a.url), "asgilook_upload_bytes_in_memory", lambda held: held == len(photo) // 2
    )
    db = await connect(library)
    try:
        async with db.transaction():
            # A's journal entries locked: its upload waits to be recorded, B's go on.
            await db.execute("SELECT FROM pending WHERE owner = $1 FOR UPDATE", owner_a)
            storing = asyncio.create_task(session.post(f"{a.url}/images", data=photo))
            async with asyncio.timeout(30):
                while not (orphaned := await unrecorded(library, owner_a)):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            converting = asyncio.create_task(
                session.post(f"{a.url}/images", data=io.BytesIO(samples.slow_png()))
            )
            await until_metric((session, a.url), "asgilook_conversion_workers_busy", bool)
            await kill(a)
            left = {key for key, owner in (await rows(library)).journal.items() if owner == owner_a}
            # PostgreSQL notices that A's connections are dead (here, at once), and its
            # statement waiting for the lock is never carried out.
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pg_backend_pid() = ANY (pg_blocking_pids(pid))"
            )
    finally:
        await db.close()
    for request in (arriving, storing, converting):
        with pytest.raises(aiohttp.ClientError):
            async with asyncio.timeout(10):
                await request
    assert orphaned <= set(await library.object_keys())  # no row names it, for now

    # A restarted while B's uploads are in flight leaves them alone.
    b_uploads += [asyncio.create_task(upload(session, b, samples.slow_png())) for _ in range(2)]
    (a,) = await nodes.start("a", flags=LEASE)
    acknowledged.extend(await asyncio.gather(*b_uploads))
    # Once A's lease has passed, a node takes over what A left, and undoes it.
    await until_rows(library, lambda index: not left & set(index.journal))

    assert sorted(await listed(session, a)) == sorted(c["id"] for c in acknowledged)
    for created in acknowledged:
        answers = [await fetch(session, node, created["image"]) for node in (a, b)]
        assert answers[0][0] == answers[1][0] == 200
        assert answers[0][2] == answers[1][2]
    index = await assert_consistent(library, session, b)
    assert not orphaned & set(await library.object_keys())
    # What is journaled now is the live nodes' ids to come, of which there is nothing.
    assert not {image_key(key) for key in index.journal} & (index.images | index.thumbnails)
    nodes.assert_no_server_errors()


async def test_a_node_killed_mid_delete_leaves_nothing_once_its_lease_passes(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b", flags=LEASE)
    photo = samples.encode(samples.photo((512, 384)), "JPEG")
    created = await asyncio.gather(*(upload(session, b, photo) for _ in range(10)))
    made = [
        fetch(session, node, c["thumbnails"][n]) for c in created for n, node in enumerate((a, b))
    ]
    assert {status for status, _, _ in await asyncio.gather(*made)} == {200}
    stored = {c["id"]: await image_bytes(session, b, c) for c in created}
    waiting, deleting, untouched = created[0], created[1:8], created[8:]

    db = await connect(library)
    try:
        async with db.transaction():
            # One deletion waits for its row, and never gets it; the others remove their
            # rows, then wait for the object store to remove their objects.
            await db.execute("SELECT FROM images WHERE id = $1 FOR UPDATE", waiting["id"])
            library.seaweedfs.freeze()
            try:
                requests = [asyncio.create_task(delete(session, a, c)) for c in created[:8]]
                index = await until_rows(
                    library, lambda index: {c["id"] for c in deleting} <= set(index.journal)
                )
                await kill(a)
            finally:
                library.seaweedfs.thaw()
    finally:
        await db.close()
    for request in requests:
        with pytest.raises(aiohttp.ClientError):
            await request
    (owner_a,) = {index.journal[c["id"]] for c in deleting}
    # Their rows are gone and their objects are not: the kill came mid-delete.
    assert await unrecorded(library, owner_a) == {image_key(c["id"]) for c in deleting}

    # Once A's lease has passed, B takes over what A left, and undoes it.
    left = {key for key, owner in index.journal.items() if owner == owner_a}
    await until_rows(library, lambda index: not left & set(index.journal))
    for c in deleting:
        for path in (f"/images/{c['id']}", c["image"], *c["thumbnails"]):
            assert (await fetch(session, b, path))[0] == 404
    for c in (waiting, *untouched):
        assert await image_bytes(session, b, c) == stored[c["id"]]
        for path in c["thumbnails"]:
            assert (await fetch(session, b, path))[0] == 200
    assert sorted(await listed(session, b)) == sorted(c["id"] for c in (waiting, *untouched))
    await assert_consistent(library, session, b)
    assert await delete(session, b, waiting) == 204  # not left half-deleted either
    await assert_consistent(library, session, b)
    nodes.assert_no_server_errors()


async def test_a_node_stopped_as_it_sweeps_leaves_nothing_journaled_in_its_name(
    nodes: Nodes, library: Library
) -> None:
    (node,) = await nodes.start("a", flags=LEASE)
    # What a node that died long ago left: undoing each entry asks both the index and the
    # object store, so sweeping these takes seconds.
    dead = "a-node-that-died"
    left = {str(uuid.uuid4()) for _ in range(2000)}
    db = await connect(library)
    try:
        await db.execute(
            "INSERT INTO pending (id, owner, expires) "
            "SELECT key, $2, now() - interval '1 minute' FROM unnest($1::text[]) AS key",
            list(left),
            dead,
        )
    finally:
        await db.close()
    # The node has begun: some of them are in its name now.
    await until_rows(library, lambda index: bool(set(index.journal.values()) - {dead}))

    node.signal(signal.SIGTERM)
    assert await node.exit_code() == 0
    index = await rows(library)
    # What it had taken over is undone; the rest is left to the next node, as it was.
    assert set(index.journal.values()) == {dead}
    assert set(index.journal) < left
    nodes.assert_no_server_errors()


async def test_thumbnails_a_dead_node_was_making_are_made_once_its_lease_passes(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b", flags=(*LEASE, "--dependency-timeout", "10"))
    photo = samples.encode(samples.photo((512, 384)), "JPEG")
    created = await asyncio.gather(*(upload(session, b, photo) for _ in range(4)))
    (owner_b,) = set((await rows(library)).journal.values())  # ids B journaled ahead
    paths = [path for c in created for path in c["thumbnails"]]
    keys = {path.removeprefix("/") for path in paths}

    library.seaweedfs.freeze()
    try:
        # A claims every thumbnail, then waits for the store to read the images from.
        making = [asyncio.create_task(fetch(session, a, path)) for path in paths]
        await until_rows(library, lambda index: keys <= set(index.journal))
        await kill(a)
        # B takes A's claims over once A's lease has passed, to undo them, and waits for
        # the store to remove the first thumbnail; meanwhile clients ask B for them all.
        await until_rows(library, lambda index: {index.journal.get(k) for k in keys} == {owner_b})
        db = await connect(library)
        try:
            async with db.transaction():
                # No thumbnail is recorded for a while: until B has undone what A left.
                await db.execute(
                    "SELECT FROM images WHERE id = ANY ($1::text[]) FOR UPDATE",
                    [c["id"] for c in created],
                )
                asking = asyncio.gather(*(fetch(session, b, path) for path in paths * 2))
                library.seaweedfs.thaw()
                await asyncio.sleep(0.5)
        finally:
            await db.close()
    finally:
        library.seaweedfs.thaw()
    for request in making:
        with pytest.raises(aiohttp.ClientError):
            await request
    answers = await asking
    # Each made once, by B, after what A left was undone: never undone under B's feet.
    assert [status for status, _, _ in answers] == [200] * len(answers)
    assert [body for _, _, body in answers[: len(paths)]] == [
        b for _, _, b in answers[len(paths) :]
    ]
    assert await conversions(session, b) == len(paths)
    await assert_consistent(library, session, b)
    nodes.assert_no_server_errors()


class _Instant:
    """Stands in for the worker pool: every thumbnail is 1000 bytes, made at once."""

    async def run(self, fn: Any, source: bytes, destination: Destination, *size: int) -> Converted:
        await asyncio.sleep(0)
        return Converted(size[0], size[1], 1000, "0" * 64, destination.put(b"\xff" * 1000))


async def test_a_thumbnail_asked_for_as_its_node_evicts_it_is_made_again_whole(
    library: Library,
) -> None:
    # In this process, to stop the eviction at the moment it removes the thumbnail.
    from asgilook_aiohttp.storage.postgres import PostgresIndex  # noqa: PLC0415 - the extra
    from asgilook_aiohttp.storage.s3 import S3Blobs  # noqa: PLC0415

    removing = asyncio.Event()
    go_on = asyncio.Event()

    class HeldBlobs(S3Blobs):
        async def delete(self, keys: Collection[str]) -> None:
            removing.set()
            await go_on.wait()
            await super().delete(keys)

    index = PostgresIndex(library.index, password=None, timeout=5)
    blobs = HeldBlobs(
        library.bucket,
        "library/",
        endpoint=library.seaweedfs.endpoint,
        region=library.seaweedfs.region,
        access_key=library.seaweedfs.access_key,
        secret_key=library.seaweedfs.secret_key,
        timeout=5,
    )
    await index.open()
    await blobs.open()
    try:
        journal = Journal(index, blobs, lease=60)
        thumbnails = Thumbnails(
            index,
            blobs,
            journal,
            cast(Converter, _Instant()),
            budget_bytes=1500,
            quality=90,
            conversion_timeout=60,
            counted=lambda totals: None,
        )
        first, second = (ImageRecord(str(uuid.uuid4()), 0, 64, 64, 1, "0" * 64) for _ in "12")
        for image in (first, second):
            await blobs.keep(image_key(image.id), b"\xff")
            await index.journal([image.id], journal.owner, 60)
            await index.add(image, journal.owner)
        assert await thumbnails.make(first, 32, 32) is not None
        # The second thumbnail passes the budget: the first is evicted, and is asked for
        # again as its blob is about to be removed.
        evicting = asyncio.create_task(thumbnails.make(second, 32, 32))
        await removing.wait()
        again = asyncio.create_task(thumbnails.make(first, 32, 32))
        await asyncio.wait({again}, timeout=0.5)
        go_on.set()
        await evicting
        assert await again is not None
        kept = await rows(library)
        assert thumbnail_key(first.id, 32, 32) in kept.thumbnails
        assert sorted(await library.object_keys()) == sorted(kept.images | kept.thumbnails)
    finally:
        await blobs.close()
        await index.close()


async def slow_reader(node: Server, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that asks for ``path`` with room for little of the answer until it
    is read, so that the server's writes wait for the client."""
    address = urlsplit(node.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (address.hostname, address.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: test\r\nX-Request-ID: slow-reader\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    return reader, writer


async def test_a_deletion_while_another_node_streams_the_image_is_no_server_error(
    nodes: Nodes, library: Library, session: aiohttp.ClientSession
) -> None:
    a, b = await nodes.start("a", "b")
    created = await upload(session, a, samples.slow_png())
    whole = await image_bytes(session, a, created)
    reader, writer = await slow_reader(b, created["image"])
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"Content-Length: {len(whole)}\r\n".encode() in head
        received = await reader.readexactly(256 * 1024)
        await asyncio.sleep(0.2)
        assert await delete(session, a, created) == 204
        # B is still sending: it logs a request once it has answered it.
        assert "slow-reader" not in nodes.log("b").read_text()
        while chunk := await reader.read(256 * 1024):
            received += chunk
            await asyncio.sleep(0.001)
    finally:
        writer.close()
    # All of it, or cut short of its Content-Length so that the client knows.
    assert whole.startswith(received)
    assert (await fetch(session, b, created["image"]))[0] == 404
    assert await library.object_keys() == []
    nodes.assert_no_server_errors()


async def refused(
    tmp_path: Path, *flags: str, env: dict[str, str] | None = None, status: int = 1
) -> list[str]:
    """Start a node that must refuse to start, with exit status ``status`` (2: for its
    settings); the lines it wrote."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ASGILOOK_", "AWS_", "PG"))}
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "run.py", "--port", "0", "--storage", str(tmp_path / "scratch")),
        *flags,
        cwd=ROOT,
        env={**clean, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await process.communicate()
    assert process.returncode == status
    assert stdout == b""
    return stderr.decode().splitlines()


@pytest.mark.parametrize(
    ("index", "blobs"),
    [("postgresql://postgres@127.0.0.1:5432/asgilook", "file"), ("sqlite", "s3://asgilook/x")],
)
async def test_a_mixed_pair_is_refused_in_one_line(tmp_path: Path, index: str, blobs: str) -> None:
    said = await refused(tmp_path, "--index", index, "--blobs", blobs, status=2)
    kinds = index.partition(":")[0], blobs.partition(":")[0]
    assert said == [
        f"asgilook-aiohttp: --index {kinds[0]} and --blobs {kinds[1]} do not go together: use "
        "sqlite with file (one machine) or postgresql with s3 (several nodes)"
    ]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize("unreachable", ["PostgreSQL", "the object store", "the bucket"])
async def test_a_node_that_cannot_reach_its_library_says_which_in_one_line(
    library: Library, tmp_path: Path, unreachable: str
) -> None:
    flags = dict(zip(library.flags()[::2], library.flags()[1::2], strict=True))
    if unreachable == "PostgreSQL":
        flags["--index"] = f"postgresql://postgres@127.0.0.1:{closed_port()}/nowhere"
        said = "asgilook-aiohttp: cannot start: PostgreSQL is unavailable: cannot connect"
    elif unreachable == "the object store":
        flags["--s3-endpoint"] = f"http://127.0.0.1:{closed_port()}"
        said = "asgilook-aiohttp: cannot start: the object store is unavailable"
    else:
        flags["--blobs"] = "s3://no-such-bucket/library"
        said = "asgilook-aiohttp: there is no bucket 'no-such-bucket'"
    argv = [item for flag in flags.items() for item in flag]
    lines = await refused(tmp_path, *argv, "--dependency-timeout", "2", env=library.env())
    assert len(lines) == 1, lines
    assert lines[0].startswith(said)
