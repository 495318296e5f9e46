"""Prometheus metrics move as uploads, refusals and downloads happen."""

from __future__ import annotations

import samples
from checks import ClientFactory, scrape, value


async def test_metrics_follow_uploads_refusals_and_downloads(make_client: ClientFactory) -> None:
    client = await make_client(max_upload_bytes=100_000)
    png = samples.encode(samples.two_tone((640, 360)), "PNG")
    before = await scrape(client)
    assert value(before, "asgilook_images_stored") == 0

    image = await (await client.post("/images", data=png)).json()
    assert (await client.post("/images", data=b"not an image at all")).status == 415
    assert (await client.post("/images", data=b"\0" * 200_000)).status == 413
    assert (await client.get(image["image"])).status == 200
    assert (await client.get(image["image"], headers={"Range": "bytes=0-9"})).status == 206
    assert (await client.get(image["thumbnails"][0])).status == 200
    assert (await client.get("/nowhere")).status == 404

    after = await scrape(client)
    assert value(after, "asgilook_images_stored") == 1
    assert value(after, "asgilook_image_bytes_stored") > 0
    assert value(after, "asgilook_thumbnail_bytes_stored") > 0
    assert value(after, "asgilook_conversion_queue_depth") == 0
    assert ("asgilook_upload_bytes_in_memory", ()) in after
    assert value(after, "asgilook_upload_bytes_in_memory") == 0  # every body let go
    requests = "asgilook_http_requests_total"
    assert value(after, requests, route="/images", method="POST", status="201") == 1
    assert value(after, requests, route="/images", method="POST", status="415") == 1
    assert value(after, requests, route="/images", method="POST", status="413") == 1
    image_route = "/images/{image_id}.jpeg"
    assert value(after, requests, route=image_route, method="GET", status="200") == 1
    assert value(after, requests, route=image_route, method="GET", status="206") == 1
    assert value(after, requests, route="unmatched", method="GET", status="404") == 1
    assert (
        value(after, "asgilook_http_request_duration_seconds_count", route="/images", method="POST")
        == 3
    )
    rejections = "asgilook_upload_rejections_total"
    assert value(after, rejections, reason="not-an-image") == 1
    assert value(after, rejections, reason="too-large") == 1
    conversions = "asgilook_conversions_total"
    assert value(after, conversions, job="convert_upload", outcome="ok") == 1
    assert value(after, conversions, job="convert_upload", outcome="rejected") == 1
    assert value(after, conversions, job="make_thumbnail", outcome="ok") == 1
    assert value(after, "asgilook_conversion_duration_seconds_count", job="convert_upload") == 2

    token = image["delete_token"]
    deleting = await client.delete(
        image["image"][:-5], headers={"Authorization": f"Bearer {token}"}
    )
    assert deleting.status == 204
    gone = await scrape(client)
    assert value(gone, "asgilook_images_stored") == 0
    assert value(gone, "asgilook_image_bytes_stored") == 0
    assert value(gone, "asgilook_thumbnail_bytes_stored") == 0
