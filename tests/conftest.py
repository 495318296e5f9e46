from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient, AiohttpServer

from asgilook_aiohttp.app import create_app
from asgilook_aiohttp.config import Config
from asgilook_aiohttp.connections import connection_options

from checks import Client, ClientFactory
from cluster import library  # noqa: F401
from engine_postgres import postgres, postgres_url  # noqa: F401
from engine_seaweedfs import s3_bucket, seaweedfs  # noqa: F401
from serving import stop_all


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


@pytest.fixture
def config(storage: Path) -> Config:
    return Config(storage_path=storage, workers=1, conversion_timeout=60)


@pytest.fixture
def make_client(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, config: Config
) -> ClientFactory:
    """A client for a fresh app on the test's storage; keyword arguments override config."""

    async def make(**overrides: Any) -> Client:
        configured = replace(config, **overrides)
        server = await aiohttp_server(create_app(configured), **connection_options(configured))
        return cast(Client, await aiohttp_client(server))

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    return await make_client()


@pytest.fixture(autouse=True)
async def stop_servers_left_running() -> AsyncIterator[None]:
    yield
    await stop_all()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for servers run as real processes."""
    async with aiohttp.ClientSession() as session:
        yield session
