"""Nodes on a shared library: PostgreSQL and a SeaweedFS bucket, as real processes or as
apps in the test's own process."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from asgilook_aiohttp.config import Config

from engine_postgres import Postgres
from engine_seaweedfs import SeaweedFS
from serving import Server, start_server


@dataclass(frozen=True)
class Library:
    """One test's shared library: its own database and its own bucket."""

    index: str
    bucket: str
    postgres: Postgres
    seaweedfs: SeaweedFS

    @property
    def blobs(self) -> str:
        return f"s3://{self.bucket}/library"

    def flags(self) -> tuple[str, ...]:
        return (
            "--index",
            self.index,
            "--blobs",
            self.blobs,
            "--s3-endpoint",
            self.seaweedfs.endpoint,
            "--s3-region",
            self.seaweedfs.region,
        )

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.seaweedfs.access_key,
            "AWS_SECRET_ACCESS_KEY": self.seaweedfs.secret_key,
        }

    def config(self, config: Config) -> Config:
        """``config`` with this library in place of the embedded one."""
        return replace(
            config,
            index=self.index,
            blobs=self.blobs,
            s3_endpoint=self.seaweedfs.endpoint,
            s3_region=self.seaweedfs.region,
            s3_access_key=self.seaweedfs.access_key,
            s3_secret_key=self.seaweedfs.secret_key,
        )

    async def start_node(self, scratch: Path, *flags: str) -> Server:
        """A server process on this library, with ``scratch`` as its own directory."""
        return await start_server(scratch, *self.flags(), *flags, env=self.env())

    async def object_keys(self) -> list[str]:
        """Every object the library holds, by key under its prefix."""
        return [key.removeprefix("library/") for key in await self.seaweedfs.keys(self.bucket)]


@pytest.fixture
def library(postgres: Postgres, postgres_url: str, seaweedfs: SeaweedFS, s3_bucket: str) -> Library:
    return Library(postgres_url, s3_bucket, postgres, seaweedfs)
