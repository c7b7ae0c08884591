"""`train.push_to_hub`: upload `final/` to the Hugging Face Hub when training ends.

Everything that can be known without uploading is checked before training starts
(`check_hub_ready`, called by the loop before any model is loaded): a repository id, offline
mode, a token, and that the hub endpoint answers at all. A run that would train for hours and
then fail to upload stops at once with one line instead.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import UserError
from posttrain.hub import offline, reach_error

CONNECT_TIMEOUT_S = 5.0


class HubError(UserError, RuntimeError):
    """push_to_hub cannot work here (offline, no token, no network, rejected upload)."""


def check_hub_ready(train_cfg) -> None:
    """One-line HubError before training when `train.push_to_hub` could not upload."""
    if not train_cfg.push_to_hub:
        return
    repo = train_cfg.hub_model_id
    if not repo or repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(
            f"train.push_to_hub=true needs train.hub_model_id as 'user/name' (got {repo!r})"
        )
    if offline():
        raise HubError(
            f"train.push_to_hub=true (to {repo}) but HF_HUB_OFFLINE is set: unset it or set "
            "train.push_to_hub=false"
        )
    from huggingface_hub import constants, get_token

    if not get_token():
        raise HubError(
            f"train.push_to_hub=true (to {repo}) but no Hugging Face token: run `hf auth login` "
            "or set HF_TOKEN"
        )
    problem = reach_error(constants.ENDPOINT, CONNECT_TIMEOUT_S)
    if problem is not None:
        raise HubError(f"train.push_to_hub=true (to {repo}) but {problem}: no network?")


def push_final(train_cfg, final_dir: Path) -> str:
    """Upload `final_dir` (model, tokenizer, README.md model card) to `train.hub_model_id`;
    returns the repository URL. The repository is created private unless `hub_private` is off."""
    from huggingface_hub import create_repo, upload_folder

    repo = train_cfg.hub_model_id
    try:
        url = create_repo(repo, private=train_cfg.hub_private, exist_ok=True)
        upload_folder(
            repo_id=repo,
            folder_path=str(final_dir),
            commit_message=f"posttrain: upload {Path(train_cfg.output_dir).name}/final",
        )
    except Exception as e:  # network, permissions, quota: the message says which
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubError(
            f"push_to_hub: uploading {final_dir} to {repo} failed: {first} (the model is saved "
            "locally; upload it later with `hf upload`)"
        ) from e
    return str(url)
