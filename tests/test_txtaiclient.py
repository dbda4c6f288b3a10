"""txtai's own Python client (txtai-py) against aioserver, over HTTPS with a token.

The client runs in a process of its own, as a user runs it: the server's URL and token in
``TXTAI_API_URL`` and ``TXTAI_API_TOKEN``, the test CA in ``SSL_CERT_FILE`` (OpenSSL's default
trust store, which the client's aiohttp reads), nothing of ours imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PemFiles, Server

# Any visible ASCII characters, as txtai takes tokens: '@', '!', '#' made aioserver answer 400.
TOKEN = "p@ss!w#rd~42"
ARTICLE = (
    "Solar power is growing fast across the world. Cheap solar panels have made solar power the cheapest "
    "electricity in many countries. My neighbour painted his fence blue. Storage batteries now let solar power "
    "reach homes at night. The weather was nice yesterday. Analysts expect solar power and batteries to keep growing."
)
CLIENT = """
import json, sys
from txtai.client import Segmentation, Summary, Textractor, Workflow

page, article = sys.argv[1], sys.argv[2]
answers = {
    "workflow": Workflow().workflow("shout", ["  hello  ", "world"]),
    "textract": Textractor().textract(page),
    "batchtextract": Textractor().batchtextract([page, "<p>Inline.</p>"]),
    "segment": Segmentation().segment("One sentence here. Another one there."),
    "summary": Summary().summary(article),
    "summary_lengths": Summary().summary(article, minlength=20, maxlength=22),
    "batchsummary": Summary().batchsimilarity([article], maxlength=5),  # txtai-py's name for it
}
try:
    Workflow(token="wrong").workflow("shout", ["a"])
except Exception as exc:  # aiohttp's ClientResponseError: raise_for_status
    answers["wrong_token"] = getattr(exc, "status", repr(exc))
print(json.dumps(answers))
"""


def test_txtais_client_over_https_with_a_token(tmp_path: Path, pem_files: PemFiles) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html><nav>Menu</nav><h1>Title</h1><p>First  paragraph.</p></html>")
    config = tmp_path / "config.yml"
    config.write_text(
        f"""
textractor: {{paragraphs: true}}
segmentation: {{sentences: true}}
summary: {{sentences: 1}}
safeopen: {{directory: "{tmp_path}"}}
workflow:
  shout: {{tasks: [strip, upper]}}
"""
    )
    env = {"TOKEN": hashlib.sha256(TOKEN.encode()).hexdigest()}
    tls = ("--ssl-certfile", str(pem_files.cert), "--ssl-keyfile", str(pem_files.key))
    with Server("--config", str(config), *tls, env=env) as server:
        client_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TXTAI_")},
            "TXTAI_API_URL": f"https://localhost:{server.port}",
            "TXTAI_API_TOKEN": TOKEN,
            "SSL_CERT_FILE": str(pem_files.ca),
        }
        done = subprocess.run(
            [sys.executable, "-c", CLIENT, str(page), ARTICLE],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert answers == {
        "workflow": ["HELLO", "WORLD"],
        "textract": ["Title", "First paragraph."],
        "batchtextract": [["Title", "First paragraph."], ["Inline."]],
        "segment": ["One sentence here.", "Another one there."],
        "summary": "Cheap solar panels have made solar power the cheapest electricity in many countries.",
        "summary_lengths": "Cheap solar panels have made solar power the cheapest electricity in many countries. "
        "Analysts expect solar power and batteries to keep",
        "batchsummary": ["Cheap solar panels have made"],
        "wrong_token": 401,
    }
