"""`prism serve` as users run it: a real process with two workers, over real HTTP."""

import base64
import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from sample_catalog import draw_product_image

ROOT = Path(__file__).resolve().parents[1]


def test_serve_with_two_workers_sees_changes_in_every_worker(build_serving_home, bad_images, databases):
    settings = build_serving_home("serve-home")
    admin = {"Authorization": "Bearer serve-token"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = databases.env(settings.home, PRISM_DEVICE="cpu", PRISM_THREADS="1", PRISM_ADMIN_TOKEN="serve-token")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--workers", "2", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()[-3000:]
            time.sleep(0.3)

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
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert b"Traceback" not in out, out.decode()[-3000:]
