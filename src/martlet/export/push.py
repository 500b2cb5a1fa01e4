"""Upload a folder (a checkpoint or an export) to a model repository on the Hugging Face hub or ModelScope.

The Hugging Face side honours HF_ENDPOINT (a mirror, or a local server in tests) and HF_TOKEN.
Optimizer state and other training leftovers are not uploaded.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from martlet.errors import MartletError

logger = logging.getLogger("martlet")

# training state that a checkpoint folder holds and a model repository does not need
IGNORE = ["optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin",
          "*.tmp", ".*"]


def push_folder(folder: str, repo_id: str, *, hub: str = "huggingface", token: Optional[str] = None,
                private: bool = False, commit_message: str = "Upload model exported by Martlet") -> str:
    """Create `repo_id` if needed and upload `folder` into it; returns the repository's URL."""
    if not os.path.isdir(folder):
        raise MartletError("nothing to upload: folder not found.", file=folder, field="push_to_hub")
    if hub == "modelscope":
        return _push_modelscope(folder, repo_id, token, private, commit_message)
    return _push_huggingface(folder, repo_id, token, private, commit_message)


def _push_huggingface(folder: str, repo_id: str, token: Optional[str], private: bool, message: str) -> str:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.HF_HUB_OFFLINE:
        raise MartletError("cannot upload: HF_HUB_OFFLINE=1 forbids network access.", field="push_to_hub",
                           hint="Unset HF_HUB_OFFLINE (or set it to 0) for this command.")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, ignore_patterns=IGNORE,
                          repo_type="model")
    except OfflineModeIsEnabled:
        raise MartletError("cannot upload: huggingface_hub is in offline mode.", field="push_to_hub",
                           hint="Unset HF_HUB_OFFLINE for this command.") from None
    except HfHubHTTPError as exc:
        raise MartletError(f"the hub refused the upload to '{repo_id}': {exc}", field="hub_model_id",
                           hint="Check the repository name and that --hub_token (or HF_TOKEN) may write to it."
                           ) from None
    except OSError as exc:  # connection errors
        raise MartletError(f"cannot reach the hub ({constants.ENDPOINT}): {exc}", field="push_to_hub") from None
    logger.info("uploaded %s to %s", folder, url)
    return str(url)


def _push_modelscope(folder: str, repo_id: str, token: Optional[str], private: bool, message: str) -> str:
    try:
        from modelscope.hub.api import HubApi
    except ImportError:
        raise MartletError("--hub modelscope needs the modelscope package.", field="hub",
                           hint="pip install 'martlet[modelscope]'") from None
    api = HubApi()
    if token:
        api.login(token)
    try:
        api.create_repo(repo_id, visibility="private" if private else "public", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message, ignore_patterns=IGNORE)
    except Exception as exc:  # modelscope raises many classes
        raise MartletError(f"ModelScope refused the upload to '{repo_id}': {exc}", field="hub_model_id",
                           hint="Check the repository name and that --hub_token may write to it.") from None
    url = f"https://modelscope.cn/models/{repo_id}"
    logger.info("uploaded %s to %s", folder, url)
    return url
