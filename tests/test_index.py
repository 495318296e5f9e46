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
        plans = [
            " ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", args))
            for query, args in ((CURSOR_QUERY, ("x",)), (PAGE_QUERY, (0, 100)))
        ]
    assert plans[0].startswith("SEARCH images USING")
    assert "(id=?)" in plans[0]
    assert plans[1].startswith("SEARCH images USING INTEGER PRIMARY KEY (rowid>?)")
    assert "TEMP B-TREE" not in plans[1]


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
    await index.close()
