"""``prepare --push-to-hub``: a prepared-shard location uploaded as a Hugging Face dataset repository (private unless
asked otherwise). What goes up is what a ``datasets`` user needs: the card, the shards, the manifest and the quarantine
report (salted hashes and reasons only); the per-shard resume records stay behind."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

from ..core import storage
from ..core.errors import first_line
from . import shard_format

UPLOADED = (shard_format.CARD_NAME, shard_format.MANIFEST_NAME, shard_format.QUARANTINE_NAME)


class HubPushError(RuntimeError):
    """No token, an unreachable Hub, or a refused upload; the message never contains the token."""


def hub_endpoint() -> str:
    """The Hub's address as the environment says now (huggingface_hub's constant is read once, at import)."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT)


def check_push_ready(repo_id: str) -> None:
    """Before hours of preparing: a token exists and the Hub accepts it. Raises HubPushError (one line)."""
    if repo_id.count("/") != 1:
        raise HubPushError(f"--push-to-hub needs a repository id like 'owner/name', got '{repo_id}'")
    if not get_token():
        raise HubPushError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    try:
        HfApi(endpoint=hub_endpoint()).whoami()
    except Exception as err:  # httpx or huggingface_hub errors: one line, no token
        raise HubPushError(
            f"--push-to-hub: the Hugging Face Hub at {hub_endpoint()} is not usable ({_reason(err)})"
        ) from None


def _reason(err: BaseException) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    return f"HTTP {status}" if status else f"{type(err).__name__}: {first_line(err)}"


def files_to_upload(manifest: dict) -> list[str]:
    """Paths (relative to the location) that make up the dataset repository."""
    return list(UPLOADED) + [shard["path"] for shard in manifest["shards"]]


def push_prepared_to_hub(
    location: str, manifest: dict, repo_id: str, private: bool = True, storage_options: dict | str | None = None
) -> str:
    """Uploads the prepared location as dataset ``repo_id`` in one commit; returns the commit URL."""
    api = HfApi(endpoint=hub_endpoint())
    options = storage.storage_options_for(location, storage_options)
    handles: list[Any] = []
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        operations = []
        for path in files_to_upload(manifest):
            url = storage.join(location, path)
            if "://" in location:  # streamed from the store, not staged on local disk
                fs, remote = storage.filesystem(url, options)
                handles.append(fs.open(remote, "rb"))
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=handles[-1]))
            else:
                operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=url))
        commit = api.create_commit(
            repo_id,
            operations,
            repo_type="dataset",
            commit_message=f"hf-medvis prepare: {manifest['totals']['written']} images",
        )
    except Exception as err:
        raise HubPushError(f"pushing to dataset '{repo_id}' failed ({_reason(err)})") from None
    finally:
        for handle in handles:
            handle.close()
    return str(commit.commit_url)
