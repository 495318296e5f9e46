"""A dependency down, frozen or restarting: PostgreSQL stopped (``pg_ctl -m immediate``) or
frozen (SIGSTOP), SeaweedFS killed (SIGKILL) or frozen (SIGSTOP).

Every request that needs it is answered 503 problem+json with ``Retry-After`` within the
dependency timeout: never a 500, never a hang, never a connection cut before the headers.
What does not need it is served on. ``/readyz`` names it and ``/healthz`` stays 200. Once
it is back, service resumes by itself, without a restart, and nothing is left half-done:
every object has its row and every row its objects, and no journal entry is left.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from PIL import Image

from asgilook_aiohttp.config import Config
from asgilook_aiohttp.journal import SPARE_IDS
from asgilook_aiohttp.storage.ports import image_key, thumbnail_key

import samples
from checks import ClientFactory, bearer, converter_of, wait_until_busy
from cluster import Library
from serving import start_server

TIMEOUT = 1.0
# What a request may take beyond the dependency timeout: the app's own work, on a CI
# machine whose two cores the engines share.
MARGIN = 1.0
LEASE = 2.0
# The longest a dependency that is back may take to serve again.
RECOVERY = 10.0

PROBLEM_TYPE = "tag:asgilook-aiohttp,2026:"


class Fault:
    def __init__(
        self, name: str, dependency: str, inject: Callable[[], None], repair: Callable[[], None]
    ) -> None:
        self.name = name
        self.dependency = dependency
        """As /readyz and 503 details name it."""
        self._inject = inject
        self._repair = repair
        self._injected = False

    @property
    def of_the_index(self) -> bool:
        return self.dependency == "PostgreSQL"

    def inject(self) -> None:
        self._injected = True
        self._inject()

    def repair(self) -> None:
        """Undo the fault, once: thawing a server that runs would race with its processes
        that exit meanwhile."""
        if self._injected:
            self._injected = False
            self._repair()


FAULTS = ["seaweedfs-killed", "seaweedfs-frozen", "postgresql-stopped", "postgresql-frozen"]


def fault_of(name: str, library: Library) -> Fault:
    postgres, seaweedfs = library.postgres, library.seaweedfs
    return {
        "seaweedfs-killed": Fault(name, "the object store", seaweedfs.kill, seaweedfs.start),
        "seaweedfs-frozen": Fault(name, "the object store", seaweedfs.freeze, seaweedfs.thaw),
        "postgresql-stopped": Fault(name, "PostgreSQL", postgres.stop, postgres.start),
        "postgresql-frozen": Fault(name, "PostgreSQL", postgres.freeze, postgres.thaw),
    }[name]


@pytest.fixture(params=FAULTS)
def fault(request: pytest.FixtureRequest, library: Library) -> Iterator[Fault]:
    """A fault to inject; the engine is restored after the test, whatever happened."""
    fault = fault_of(request.param, library)
    try:
        yield fault
    finally:
        fault.repair()


@pytest.fixture
async def config(config: Config, library: Library) -> Config:
    # SeaweedFS takes up to a second to grow a volume for a bucket's first object: under
    # a one-second timeout, that would fail a test's first upload.
    async with library.seaweedfs.client() as s3:
        await s3.put_object(Bucket=library.bucket, Key="warm-up", Body=b"warm-up")
        await s3.delete_object(Bucket=library.bucket, Key="warm-up")
    return replace(library.config(config), dependency_timeout=TIMEOUT, lease_seconds=LEASE)


Send = Callable[..., AbstractAsyncContextManager[aiohttp.ClientResponse]]
"""Sends a request (method, path, options) to one node: an app's test client's
``request``, or ``on(session, server)``."""


def on(session: aiohttp.ClientSession, url: str) -> Send:
    return lambda method, path, **options: session.request(method, f"{url}{path}", **options)


@dataclass(frozen=True)
class Answer:
    request: str
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


async def ask(send: Send, method: str, path: str, **options: Any) -> Answer:
    started = time.monotonic()
    async with send(method, path, **options) as response:
        body = await response.read()
    seconds = time.monotonic() - started
    return Answer(f"{method} {path}", response.status, response.headers, body, seconds)


def assert_503(answer: Answer) -> None:
    """A 503 problem with a Retry-After, in time to be of use."""
    assert answer.status == 503, answer
    assert answer.headers["Content-Type"].partition(";")[0] == "application/problem+json"
    assert 1 <= int(answer.headers["Retry-After"]) <= 60, answer
    assert answer.seconds < TIMEOUT + MARGIN, answer


def assert_unavailable(answer: Answer, dependency: str) -> None:
    """A 503 in time that says which dependency failed, and what to do."""
    assert_503(answer)
    if answer.request.startswith("HEAD"):
        return
    problem = answer.json()
    assert problem["type"] == f"{PROBLEM_TYPE}dependency-unavailable", problem
    assert problem["detail"].startswith(f"{dependency} is unavailable: "), problem
    assert problem["detail"].endswith(f"; try again in {answer.headers['Retry-After']} s")


def assert_not_ready(answer: Answer, dependency: str) -> None:
    assert_503(answer)
    problem = answer.json()
    assert problem["type"] == f"{PROBLEM_TYPE}not-ready", problem
    assert f"{dependency} is unavailable: " in problem["detail"], problem


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What was logged as an error, but for asyncpg's leftover: a connection attempt that a
    deadline cancels just as it connects leaves a future with an exception that no one
    awaits (asyncpg 0.32's TLSUpgradeProto), which asyncio logs; nothing else comes of it."""
    return [
        record
        for record in caplog.records
        if record.levelno >= logging.ERROR
        and not (record.name == "asyncio" and "connection_lost() call" in record.getMessage())
    ]


async def until_ready(send: Send) -> float:
    """Wait for /readyz to say 200; how long that took."""
    started = time.monotonic()
    async with asyncio.timeout(RECOVERY):
        while (await ask(send, "GET", "/readyz")).status != 200:  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def upload(send: Send, data: bytes) -> dict[str, Any]:
    answer = await ask(send, "POST", "/images", data=io.BytesIO(data))
    assert answer.status == 201, answer
    created: dict[str, Any] = answer.json()
    return created


async def rows(library: Library) -> tuple[set[str], dict[str, str]]:
    """The blob keys the index's rows name (images and kept thumbnails), and its journal
    entries: key, owner."""
    import asyncpg  # noqa: PLC0415 - the extra: its fixture skips the test where it is missing

    db = await asyncpg.connect(library.index)
    try:
        images = {image_key(row["id"]) for row in await db.fetch("SELECT id FROM images")}
        thumbnails = {
            thumbnail_key(row["image_id"], row["width"], row["height"])
            for row in await db.fetch("SELECT image_id, width, height FROM thumbnails")
        }
        journal = {
            row["id"]: row["owner"] for row in await db.fetch("SELECT id, owner FROM pending")
        }
    finally:
        await db.close()
    return images | thumbnails, journal


async def until_objects_match_rows(library: Library) -> None:
    """Wait until every object in the bucket has its row and every row its object, as the
    nodes settle what a fault put off (or, past its lease, sweep it)."""
    async with asyncio.timeout(LEASE + RECOVERY):
        while set(await library.object_keys()) != (await rows(library))[0]:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


# The requests of a user of a library with one image (its largest thumbnail made, the
# next not yet) and another to delete, by name: (method, path, options).
Requests = dict[str, tuple[str, str, dict[str, Any]]]
# Those that the index alone answers, served while the object store is down (a
# deletion's blobs are removed once it is back), and metrics, which need neither.
INDEX_ONLY = {"listing": 200, "image object": 200, "revalidation": 304, "delete": 204}
NEITHER = {"metrics": 200}


def requests_of(created: dict[str, Any], doomed: dict[str, Any], etag: str) -> Requests:
    image, kept, fresh = created["image"], created["thumbnails"][0], created["thumbnails"][1]
    some_bytes = {"headers": {"Range": "bytes=10-109"}}
    deleting = {"headers": bearer(doomed["delete_token"])}
    return {
        "upload": ("POST", "/images", {"data": samples.small_png()}),
        "image": ("GET", image, {}),
        "image head": ("HEAD", image, {}),
        "image range": ("GET", image, some_bytes),
        "image range head": ("HEAD", image, some_bytes),
        "kept thumbnail": ("GET", kept, {}),
        "kept thumbnail head": ("HEAD", kept, {}),
        "new thumbnail": ("GET", fresh, {}),
        "listing": ("GET", "/images", {}),
        "image object": ("GET", f"/images/{created['id']}", {}),
        "revalidation": ("GET", image, {"headers": {"If-None-Match": etag}}),
        "delete": ("DELETE", f"/images/{doomed['id']}", deleting),
        "metrics": ("GET", "/metrics", {}),
    }


async def answers_to(send: Send, requests: Requests) -> dict[str, Answer]:
    """The answers to all of ``requests``, sent at once."""
    answers = await asyncio.gather(
        *(ask(send, method, path, **options) for method, path, options in requests.values())
    )
    return dict(zip(requests, answers, strict=True))


async def test_what_needs_a_failed_dependency_gets_503_in_time_and_service_resumes_by_itself(
    make_client: ClientFactory,
    library: Library,
    fault: Fault,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_client()
    created = await upload(client.request, samples.encode(samples.two_tone((512, 384)), "PNG"))
    doomed = await upload(client.request, samples.small_png())
    whole = await ask(client.request, "GET", created["image"])
    kept = await ask(client.request, "GET", created["thumbnails"][0])
    requests = requests_of(created, doomed, whole.headers["ETag"])

    fault.inject()
    try:
        answers = await answers_to(client.request, requests)
        ready = await ask(client.request, "GET", "/readyz")
        alive = await ask(client.request, "GET", "/healthz")
    finally:
        fault.repair()
    await until_ready(client.request)

    served_on = NEITHER if fault.of_the_index else INDEX_ONLY | NEITHER
    for name in set(requests) - set(served_on):
        assert_unavailable(answers[name], fault.dependency)
    assert {name: answers[name].status for name in served_on} == served_on
    assert all(answers[name].seconds < TIMEOUT + MARGIN for name in served_on), answers
    assert_not_ready(ready, fault.dependency)
    assert alive.status == 200

    # The same requests, answered as before the fault.
    again = {name: await ask(client.request, m, p, **o) for name, (m, p, o) in requests.items()}
    assert {name: answer.status for name, answer in again.items()} == {
        "upload": 201,
        "image": 200,
        "image head": 200,
        "image range": 206,
        "image range head": 206,
        "kept thumbnail": 200,
        "kept thumbnail head": 200,
        "new thumbnail": 200,
        "listing": 200,
        "image object": 200,
        "revalidation": 304,
        # Deleted during the fault, the image is missing, which a delete token cannot
        # tell from a wrong token.
        "delete": 204 if fault.of_the_index else 403,
        "metrics": 200,
    }
    assert again["image"].body == whole.body
    assert again["image range"].body == whole.body[10:110]
    assert again["kept thumbnail"].body == kept.body
    assert samples.decode(again["new thumbnail"].body).size == (128, 96)
    # The upload that failed is nowhere; the deletion happened, or not yet (it comes after
    # the listing), whole.
    survivors = [created["id"], doomed["id"]] if fault.of_the_index else [created["id"]]
    listed = [item["id"] for item in again["listing"].json()]
    assert listed == [*survivors, again["upload"].json()["id"]]

    # Nothing half-done: no object without its row, nor row without its object; once this
    # node has settled what it put off, it leaves no journal entry behind.
    await until_objects_match_rows(library)
    await client.close()
    assert (await rows(library))[1] == {}
    assert not errors_logged(caplog)


@functools.cache
def noise_jpeg() -> bytes:
    """12 megapixels of noise as a JPEG that an upload keeps as it is: over 20 MB, more
    than the sockets between SeaweedFS, the app and its client hold, so that a download
    still pulls from the object store long after its first bytes arrived."""
    size = (4000, 3000)
    noise = random.Random(0).randbytes(size[0] * size[1] * 3)
    return samples.encode(Image.frombytes("RGB", size, noise), "JPEG", quality=100)


async def read_on(response: aiohttp.ClientResponse, received: list[int]) -> None:
    while chunk := await response.content.read(1024 * 1024):
        received.append(len(chunk))


@pytest.mark.parametrize("fault", ["seaweedfs-killed", "seaweedfs-frozen"], indirect=True)
async def test_a_download_the_object_store_stops_feeding_midway_is_cut_short_in_time(
    make_client: ClientFactory, fault: Fault, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    data = noise_jpeg()
    created = await upload(client.request, data)
    async with client.get(created["image"]) as response:
        assert (response.status, response.content_length) == (200, len(data))
        received = [len(await response.content.readexactly(64 * 1024))]
        fault.inject()
        failed = time.monotonic()
        # The headers promised every byte: the connection ends short of them.
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_on(response, received)
        assert time.monotonic() - failed < TIMEOUT + MARGIN
    assert sum(received) < len(data)

    fault.repair()
    again = await ask(client.request, "GET", created["image"])
    assert (again.status, again.body == data) == (200, True)
    assert not errors_logged(caplog)


async def test_a_thumbnail_another_node_is_making_as_a_dependency_fails_is_503_in_time(
    make_client: ClientFactory, library: Library, fault: Fault, tmp_path: Path
) -> None:
    a = await make_client()
    b = await make_client(storage_path=tmp_path / "b")
    created = await upload(a.request, samples.slow_png())
    path = created["thumbnails"][0]
    # A claims the thumbnail and converts it; the dependency fails before A can keep it,
    # so A cannot clear its claim until it is back; meanwhile B is asked for it.
    making = asyncio.create_task(ask(a.request, "GET", path))
    await wait_until_busy(converter_of(a))
    fault.inject()
    failed = time.monotonic()
    try:
        waited = await ask(b.request, "GET", path)
        made = await making
        made_after = time.monotonic() - failed
    finally:
        fault.repair()
    assert_unavailable(waited, fault.dependency)
    assert_unavailable(replace(made, seconds=made_after), fault.dependency)

    answers = [await ask(node.request, "GET", path) for node in (b, a)]
    assert [answer.status for answer in answers] == [200, 200]
    assert answers[0].body == answers[1].body
    await until_objects_match_rows(library)
    await asyncio.gather(a.close(), b.close())
    assert (await rows(library))[1] == {}


@pytest.mark.parametrize("fault", ["postgresql-stopped"], indirect=True)
async def test_nodes_cut_off_from_postgresql_past_their_lease_take_uploads_once_it_is_back(
    make_client: ClientFactory, fault: Fault, tmp_path: Path
) -> None:
    nodes = [await make_client(), await make_client(storage_path=tmp_path / "b")]
    for node in nodes:  # each journals ids ahead for its next uploads
        await upload(node.request, samples.small_png())
    fault.inject()
    try:
        await asyncio.sleep(LEASE + 0.5)  # every lease runs out
    finally:
        fault.repair()
    for node in nodes:
        await until_ready(node.request)
    # Each node renews its leases, and sweeps what expired: the other's, if it is first.
    await asyncio.sleep(1.5)
    answers = [
        await ask(node.request, "POST", "/images", data=samples.small_png()) for node in nodes * 2
    ]
    assert [answer.status for answer in answers] == [201] * 4, answers


async def journal_lost_ids(library: Library, owner: str, count: int) -> None:
    """Leave what a write whose answer was lost leaves: ids journaled in ``owner``'s name,
    with a current lease, that the node never learnt of. (PostgreSQL frozen, or slow, with
    a node's statement in its socket runs it after the node gave up on it.)"""
    import asyncpg  # noqa: PLC0415 - the extra: its fixture skips the test where it is missing

    db = await asyncpg.connect(library.index)
    try:
        await db.execute(
            "INSERT INTO pending (id, owner, expires) "
            "SELECT 'lost-' || n, $1, now() + make_interval(secs => $2) "
            "FROM generate_series(1, $3) AS n",
            owner,
            LEASE,
            count,
        )
    finally:
        await db.close()


@pytest.mark.parametrize("then", ["lives on", "stops"])
async def test_entries_a_node_never_learnt_of_are_undone_while_it_lives_and_as_it_stops(
    make_client: ClientFactory, library: Library, then: str
) -> None:
    client = await make_client()
    await upload(client.request, samples.small_png())  # ids journaled ahead, in its name
    spares = (await rows(library))[1]
    assert len(spares) == SPARE_IDS - 1
    (owner,) = set(spares.values())
    await journal_lost_ids(library, owner, SPARE_IDS)

    if then == "stops":
        await client.close()
        assert (await rows(library))[1] == {}
    else:  # renewing only what it holds, it lets them lapse, and sweeps them
        async with asyncio.timeout(LEASE + RECOVERY):
            while (await rows(library))[1] != spares:  # noqa: ASYNC110 - polled
                await asyncio.sleep(0.1)
        assert (
            await ask(client.request, "POST", "/images", data=samples.small_png())
        ).status == 201


async def test_a_server_process_answers_503_through_each_fault_and_resumes_without_a_restart(
    library: Library, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    log = tmp_path / "node.log"
    with log.open("wb") as stderr:
        node = await start_server(
            tmp_path / "node",
            *library.flags(),
            *("--dependency-timeout", str(TIMEOUT), "--lease-seconds", str(LEASE)),
            env=library.env(),
            stderr=stderr.fileno(),
        )
    send = on(session, node.url)
    png = samples.encode(samples.two_tone((512, 384)), "PNG")
    created = await upload(send, png)
    image, thumbnail = created["image"], created["thumbnails"][0]
    assert (await ask(send, "GET", thumbnail)).status == 200

    for name in FAULTS:
        fault = fault_of(name, library)
        fault.inject()
        try:
            *answers, ready, alive = await asyncio.gather(
                ask(send, "POST", "/images", data=png),
                ask(send, "GET", image),
                ask(send, "GET", thumbnail),
                ask(send, "GET", "/readyz"),
                ask(send, "GET", "/healthz"),
            )
        finally:
            fault.repair()
        for answer in answers:
            assert_unavailable(answer, fault.dependency)
        assert_not_ready(ready, fault.dependency)
        assert alive.status == 200
        await until_ready(send)
        assert (await ask(send, "POST", "/images", data=png)).status == 201
        assert (await ask(send, "GET", image)).status == 200
        assert (await ask(send, "GET", thumbnail)).status == 200

    await until_objects_match_rows(library)
    node.signal(signal.SIGTERM)
    assert await node.exit_code() == 0
    assert (await rows(library))[1] == {}
    text = log.read_text()
    assert "Traceback" not in text
    assert '" 500 ' not in text
