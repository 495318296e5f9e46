"""The index answers every page by key lookups, never by scanning the table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from asgilook_aiohttp.index import CURSOR_QUERY, PAGE_QUERY, ImageRecord, Index


async def test_page_queries_search_by_key_at_any_depth(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    await index.open()
    await index.add(ImageRecord("00000000-0000-4000-8000-000000000000", 0, 1, 1, 1, "0" * 64))
    await index.close()

    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        cursor_plan, page_plan = (
            [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", args)]
            for query, args in ((CURSOR_QUERY, ("x", "x")), (PAGE_QUERY, (0, 100)))
        )
    searches = [step for step in cursor_plan if step.startswith(("SEARCH", "SCAN"))]
    assert len(searches) == 2  # images and tombstones, each by its key
    assert all(step.startswith("SEARCH") and "(id=?)" in step for step in searches)
    assert page_plan == ["SEARCH images USING INTEGER PRIMARY KEY (rowid>?)"]


async def test_pages_in_upload_order(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    await index.open()
    ids = [f"00000000-0000-4000-8000-{n:012d}" for n in (5, 3, 9, 1)]
    for uploaded, image_id in enumerate(ids):
        await index.add(ImageRecord(image_id, uploaded, 1, 1, 1, "0" * 64))
    first, more = await index.page(2, None)
    assert [r.id for r in first] == ids[:2]
    assert more
    rest, more = await index.page(2, ids[1])
    assert [r.id for r in rest] == ids[2:]
    assert not more
    # A page's last image deleted: its place is remembered, the next page still follows.
    assert await index.delete(ids[1]) is not None
    rest, more = await index.page(2, ids[1])
    assert [r.id for r in rest] == ids[2:]
    await index.close()
