"""Remote storage that does not answer: one retry layer with a time budget, then one line naming the location and what
to check; the Azure SDK's request log stays quiet; small metadata files are read once per process."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from azurite import ACCOUNT, ACCOUNT_KEY, free_port
from conftest import REPO, subprocess_env

from hf_medvis.core import storage
from hf_medvis.data.arguments import MAEDataArguments
from hf_medvis.data.build import build_datasets
from hf_medvis.data.prepare import prepare

SALT = "unreachable-test-salt"


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


@pytest.mark.slow
def test_pretraining_on_storage_that_does_not_answer_ends_in_one_line(tmp_path):
    """A closed port (wrong endpoint, firewall, no private link, Azurite not running): the recipe gives up when the
    retry budget is spent, with one line naming the az:// location and what to check; no traceback, no SDK request
    dump, no key; nothing written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "recipes/pretrain_mae.py", "--output_dir", str(out), "--max_steps", "2"]
        + ["--train_data", "az://container/shards"],
        cwd=REPO,
        env=subprocess_env(
            AZURE_STORAGE_CONNECTION_STRING=connection_string(free_port()),
            HF_MEDVIS_STORAGE_RETRY_SECONDS="3",  # the default (60 s) rides out longer outages; same code path
        ),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("pretrain_mae.py: error: reading az://container/shards/"), errors[0]
    assert "no answer from the storage service" in errors[0] and "firewall" in errors[0], errors[0]
    assert "Traceback" not in output and "Request URL" not in output and "http_logging_policy" not in output, output
    assert ACCOUNT_KEY not in output and "AccountKey" not in output
    # While it waited, one line said why (not one per attempt).
    assert len([line for line in output.splitlines() if "retrying for up to 3 s" in line]) == 1, output
    assert not out.exists()


class _Busy(BaseHTTPRequestHandler):
    """Answers every request 503 Server Busy, as Azure Storage does when it throttles; counts the requests."""

    requests: Counter = Counter()

    def do_GET(self):  # noqa: N802 -- the http.server handler name
        _Busy.requests[self.path.split("?", 1)[0]] += 1
        self.send_response(503, "Server Busy")
        self.send_header("x-ms-error-code", "ServerBusy")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):  # keep the test output clean
        pass


def test_one_retry_layer_with_a_time_budget(monkeypatch, caplog):
    """Every request the service sees is one attempt of ours: the SDK's own retries (3 more per attempt, after 15 to
    24 s each) are off. When the budget is spent: one line, with the location and the number of attempts."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Busy.requests.clear()
    monkeypatch.setenv("HF_MEDVIS_STORAGE_RETRY_SECONDS", "4")  # room for 2+ attempts on a busy machine
    options = {"connection_string": connection_string(server.server_address[1])}
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(storage.StorageAccessError) as info:
            storage.read_bytes("az://busy/set/manifest.json", options)
    finally:
        server.shutdown()
        server.server_close()
    message = str(info.value)
    assert message.startswith("reading az://busy/set/manifest.json: the storage service kept answering 503"), message
    attempts = int(re.search(r"gave up after (\d+) attempt", message).group(1))
    assert attempts >= 2 and _Busy.requests == {f"/{ACCOUNT}/busy/set/manifest.json": attempts}
    assert "\n" not in message and ACCOUNT_KEY not in message
    assert not [r for r in caplog.records if r.name.startswith("azure")]  # the SDK's request log stays at WARNING
    assert [r.levelname for r in caplog.records if r.name == storage.__name__].count("WARNING") == 1


def test_retry_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_MEDVIS_STORAGE_RETRY_SECONDS", "15")
    assert storage.retry_budget() == 15.0
    monkeypatch.setenv("HF_MEDVIS_STORAGE_RETRY_SECONDS", "soon")
    with pytest.raises(ValueError, match="HF_MEDVIS_STORAGE_RETRY_SECONDS='soon'"):
        storage.retry_budget()
    monkeypatch.delenv("HF_MEDVIS_STORAGE_RETRY_SECONDS")
    assert storage.retry_budget() == storage.DEFAULT_RETRY_SECONDS


@pytest.mark.azurite
def test_metadata_files_are_read_once_per_process(azurite, phantom_dir, monkeypatch):
    """Building the datasets of a run asks for the manifest and the origin marker several times (origin, shard check,
    stream, counts, normalisation): each object is fetched once. A write by this process is read back."""
    container = azurite.create_container("read-once")
    url = f"{container}/set"
    prepare(
        str(phantom_dir / "images"), url, size=32, shard_size=50, salt=SALT, storage_options=azurite.storage_options
    )
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    storage.forget_cached_reads()
    fs, _ = storage.filesystem(url)  # the instance every read of these options goes through (fsspec reuses it)
    fetched: Counter = Counter()
    real_cat_file = fs.cat_file

    def counting_cat_file(path, *args, **kwargs):
        fetched[path.rsplit("/", 1)[-1]] += 1
        return real_cat_file(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", counting_cat_file)
    args = MAEDataArguments(train_data=url, validation_data=url)
    data = build_datasets(args, task="mae", image_size=32)
    assert data.info["train_images"] > 0 and data.source.synthetic  # the origin came through the manifest
    assert fetched["manifest.json"] == 1 and fetched["phantoms.json"] <= 1, fetched
    manifest_url = storage.join(url, "manifest.json")
    changed = {**json.loads(storage.read_metadata(manifest_url)), "note": "rewritten"}
    storage.write_json_atomic(manifest_url, changed)
    assert json.loads(storage.read_metadata(manifest_url))["note"] == "rewritten"
    assert fetched["manifest.json"] == 2
