"""Hub fail-fast: a run that will push must learn before its first step that it cannot, not after hours of training."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from transformers import TrainingArguments

from ..data.hub_push import hub_endpoint


class HubNotReadyError(RuntimeError):
    """No token, a rejected token, or an unreachable Hub; the message never contains the token."""


def check_hub_ready(args: TrainingArguments, timeout: float = 10.0) -> str:
    """Verifies that a token exists and that the Hub accepts it; returns the user name. Raises HubNotReadyError."""
    token = args.hub_token or get_token()
    if not token:
        raise HubNotReadyError(
            "--push_to_hub needs a Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --hub_token"
        )
    endpoint = hub_endpoint()
    try:
        # A reachability probe with a hard timeout first: a black-holed network must not hang the launch.
        urllib.request.urlopen(f"{endpoint}/api/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # the Hub answered (any status): reachable
    except (urllib.error.URLError, OSError) as err:
        raise HubNotReadyError(
            f"--push_to_hub: cannot reach the Hugging Face Hub at {endpoint} ({_reason(err)})"
        ) from None
    try:
        user = HfApi(endpoint=endpoint).whoami(token=token)
    except OSError as err:
        raise HubNotReadyError(
            f"--push_to_hub: cannot reach the Hugging Face Hub at {endpoint} ({type(err).__name__})"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise HubNotReadyError(f"--push_to_hub: the Hub at {endpoint} rejected the token (HTTP {status})") from None
    return str(user.get("name", "?"))


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__


def keep_token_out_of_outputs(args: TrainingArguments) -> None:
    """The Trainer pickles its arguments into every checkpoint (training_args.bin) and pushes them; a ``--hub_token``
    would travel with them. Hand it to huggingface_hub through the environment instead."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None


def hub_model_id(name: str | None) -> str | None:
    """``name`` when it is a Hub model id (``owner/name``, not an existing local path or a URL), else None: only a Hub
    id is named as ``base_model`` in a model card; local folders are not."""
    if not name or "://" in name or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    return None if Path(name).exists() else name
