"""The OpenAPI document at /openapi.json: served, valid, and true to the app."""

from __future__ import annotations

from checks import Client


async def test_the_document_is_served_as_json(client: Client) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert document["openapi"].startswith("3.1.")
    assert response.headers["ETag"]
