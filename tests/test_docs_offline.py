"""/docs without internet: Swagger UI from packaged assets, rendered by a real headless Chromium.

The browser test needs Debian's ``chromium`` (``.ci/run`` installs it when missing); it is
skipped, saying so, only where no Chromium binary exists.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi.testclient import TestClient

from buckets import b, define_bucket
from workflows.api import create_app

PRO = define_bucket(id="pro", criteria=b.prop("plan").eq("pro"))
CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)


def test_docs_pages_load_nothing_from_the_internet(make_runtime):
    with TestClient(create_app(make_runtime(PRO))) as client:
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200
            sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
            assert sources
            assert all(source.startswith("/static-offline-docs/") for source in sources), sources
            for source in sources:
                asset = client.get(source)
                assert asset.status_code == 200, source
                assert len(asset.content) > 100


@pytest.fixture
def served(make_runtime) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(make_runtime(PRO)), host="127.0.0.1", port=port)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_docs_render_the_operations_in_headless_chromium(served: str, tmp_path):
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",  # let Swagger UI fetch /openapi.json and render
        "--dump-dom",
        f"{served}/docs",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert "SwaggerUIBundle is not defined" not in done.stderr
    assert 'class="swagger-ui' in dom, dom[:2000]
    for path in ("/buckets/{bucket_id}/members", "/events", "/readyz", "/jobs/{job_id}"):
        assert f'data-path="{path}"' in dom, path
    assert dom.count('class="opblock ') >= 15  # every operation is listed
