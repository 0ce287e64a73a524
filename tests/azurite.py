"""Starts and stops a real Azurite (local Azure Blob Storage emulator) for tests; installs it with `make azurite`
when the project-local copy is missing."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AZURITE_MAIN = REPO / ".azurite" / "node_modules" / "azurite" / "dist" / "src" / "blob" / "main.js"
ACCOUNT = "devstoreaccount1"
# Azurite's published well-known development key (not a secret).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> Path:
    if AZURITE_MAIN.exists():
        return AZURITE_MAIN
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("Azurite tests need Node.js and npm (apt-get install nodejs npm), then `make azurite`")
    result = subprocess.run(["make", "azurite"], cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not AZURITE_MAIN.exists():
        raise RuntimeError(f"`make azurite` failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return AZURITE_MAIN


@dataclass
class Azurite:
    """One Azurite blob service on 127.0.0.1; ``restart`` keeps port and data (for outage tests)."""

    location: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    @property
    def storage_options(self) -> dict:
        return {"connection_string": self.connection_string}

    def start(self, timeout: float = 30.0) -> Azurite:
        main = ensure_installed()
        self.location.mkdir(parents=True, exist_ok=True)
        command = [
            "node",
            str(main),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(self.port),
            "--location",
            str(self.location),
            "--silent",
            "--skipApiVersionCheck",
            "--loose",
            "--disableTelemetry",
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Azurite exited: {self.process.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        """Stops our process by PID (SIGTERM lets Azurite flush its metadata to --location)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_container(self, name: str) -> str:
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(self.connection_string)
        try:
            client.create_container(name)
        except Exception as err:  # already there
            if "ContainerAlreadyExists" not in str(err):
                raise
        return f"az://{name}"
