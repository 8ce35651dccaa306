"""`prism serve` as users run it: a real process with two workers, over real HTTP."""

import base64
import io

import httpx

from prism_server import PrismServer
from sample_catalog import draw_product_image


def test_serve_with_two_workers_sees_changes_in_every_worker(build_serving_home, bad_images, databases, tmp_path):
    settings = build_serving_home("serve-home")
    admin = {"Authorization": "Bearer serve-token"}
    env = databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1", PRISM_ADMIN_TOKEN="serve-token")
    log = tmp_path / "serve.log"
    with PrismServer(env, workers=2, log=log).start(timeout_s=120) as server:
        base = server.url
        r = httpx.get(base + "/v1/search", params={"q": "red shoe", "target": "image", "k": 5})
        assert r.status_code == 200 and len(r.json()["results"]) == 5 and r.json()["query_id"]

        buf = io.BytesIO()
        draw_product_image(7007).save(buf, format="PNG")
        image = buf.getvalue()
        put = httpx.put(base + "/v1/products/SERVE-1", headers=admin, json={"title": "serve test", "image_b64": base64.b64encode(image).decode()})
        assert put.status_code == 201, put.text

        def first_ids(n: int) -> list[str]:
            # A fresh connection per request, so the kernel spreads them over both workers.
            return [
                httpx.post(base + "/v1/search/image", files={"file": ("q.png", image, "image/png")}, data={"k": "1"})
                .json()["results"][0]["product_id"]
                for _ in range(n)
            ]

        assert first_ids(12) == ["SERVE-1"] * 12
        assert httpx.delete(base + "/v1/products/SERVE-1", headers=admin).status_code == 204
        assert "SERVE-1" not in first_ids(12)

        for name, status in (("truncated", 422), ("zip", 415), ("bomb", 413), ("strip", 422)):
            r = httpx.post(base + "/v1/search/image", files={"file": ("q.png", bad_images[name], "image/png")})
            assert r.status_code == status and r.json()["detail"]

        metrics = httpx.get(base + "/metrics").text
        searches = [line for line in metrics.splitlines()
                    if line.startswith('prism_http_requests_total{method="POST",route="/v1/search/image",status="200"}')]
        assert searches and float(searches[0].split()[-1]) == 24  # summed over both workers
    out = log.read_text(errors="replace")
    assert "Traceback" not in out, out[-3000:]
