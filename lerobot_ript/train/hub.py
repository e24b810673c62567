"""Pushing a trained policy to the Hugging Face Hub: a model card, and a push that survives Hub downtime.

A push at the end of a long training run must not throw the run away when the Hub is unreachable:
`push_folder_with_retry` retries transient failures (HTTP 5xx / 408 / 429, connection errors, timeouts)
with exponential backoff, and when the push still fails it returns a `PushResult` with `ok=False` and the
one shell command that pushes the same folder later. Tokens never appear in that command, in log lines or
in the returned error text.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
# Hugging Face user access tokens: "hf_" followed by letters and digits.
_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")
# A config key containing one of these (case-insensitive, '-' read as '_') is dropped from model cards.
_SECRET_KEY_PARTS = ("token", "password", "secret", "api_key")
# HTTP statuses worth retrying: request timeout, rate limit, and every server error (>= 500).
_TRANSIENT_STATUSES = frozenset({408, 429})
_VALID_REPO_TYPES = ("model", "dataset")
MODEL_CARD_TAGS = ("lerobot", "ript", "robotics", "reinforcement-learning")


@dataclass(frozen=True)
class PushResult:
    """Outcome of `push_folder_with_retry`. `error` and `retry_command` are free of tokens."""

    ok: bool
    repo_id: str
    repo_type: str
    # Number of push attempts made (1 + retries used).
    attempts: int
    # URL and id of the commit that holds the folder, when ok.
    commit_url: str | None = None
    commit_oid: str | None = None
    # Last error, redacted, when not ok.
    error: str | None = None
    # Shell command that pushes the same folder later (token read from HF_TOKEN / `hf auth login`), when not ok.
    retry_command: str | None = None


def redact_text(text: str, *secrets: str | None) -> str:
    """`text` with every given secret and every string that looks like an HF token replaced by REDACTED."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _HF_TOKEN_PATTERN.sub(REDACTED, text)


def _is_secret_key(key: object) -> bool:
    normalized = str(key).lower().replace("-", "_")
    return any(part in normalized for part in _SECRET_KEY_PARTS)


def redact_secrets(obj: Any) -> Any:
    """A copy of `obj` without secrets, recursive over dicts, lists and tuples.

    Dict keys containing "token", "password", "secret" or "api_key" (case-insensitive) are dropped; strings that
    look like an HF token (`hf_` + 8 or more letters/digits) are replaced by "<redacted>". Other values are kept.
    """
    if isinstance(obj, dict):
        return {key: redact_secrets(value) for key, value in obj.items() if not _is_secret_key(key)}
    if isinstance(obj, list):
        return [redact_secrets(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(redact_secrets(value) for value in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def is_transient_error(err: BaseException) -> bool:
    """True for failures that may pass on a later try: HTTP 408/429/5xx, connection errors and timeouts."""
    if isinstance(err, OfflineModeIsEnabled):  # HF_HUB_OFFLINE=1: retrying cannot help
        return False
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        return status is not None and (status >= 500 or status in _TRANSIENT_STATUSES)
    return isinstance(err, httpx.TransportError | ConnectionError | TimeoutError)


def build_retry_command(
    folder: str | Path,
    repo_id: str,
    repo_type: str = "model",
    *,
    path_in_repo: str | None = None,
    private: bool | None = None,
    allow_patterns: Sequence[str] | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """The `hf upload` command that performs the same push as `push_folder_with_retry`; never holds a token.

    A server other than the public Hub (`endpoint`, or HF_ENDPOINT when it is None) and a disabled Xet backend
    are carried as environment prefixes, so the command reaches the same server from any shell. The token comes
    from `HF_TOKEN` or `hf auth login` when it runs.
    """
    env = []
    server = (endpoint or constants.ENDPOINT).rstrip("/")
    if server != constants._HF_DEFAULT_ENDPOINT.rstrip("/"):
        env.append(f"HF_ENDPOINT={shlex.quote(server)}")
    if constants.HF_HUB_DISABLE_XET:
        env.append("HF_HUB_DISABLE_XET=1")
    args = ["hf", "upload", repo_id, str(Path(folder).resolve())]
    if path_in_repo:
        args.append(path_in_repo)
    args += ["--repo-type", repo_type]
    if private is not None:
        args.append("--private" if private else "--no-private")
    for pattern in allow_patterns or ():
        args += ["--include", pattern]
    if commit_message:
        args += ["--commit-message", commit_message]
    return " ".join(env + [shlex.quote(redact_text(arg)) for arg in args])


def _validate_push_args(
    folder: Path, repo_id: str, repo_type: str, max_retries: int, backoff_s: float
) -> None:
    if not folder.is_dir():
        raise ValueError(
            f"folder={str(folder)!r} is not a directory. Pass the folder that holds the files to push."
        )
    if repo_type not in _VALID_REPO_TYPES:
        raise ValueError(
            f"repo_type={repo_type!r} is not supported. Choose one of {list(_VALID_REPO_TYPES)}."
        )
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r} must be '<namespace>/<name>', e.g. 'my-user/ript-metaworld'.")
    if max_retries < 0 or backoff_s < 0:
        raise ValueError(
            f"max_retries={max_retries} and backoff_s={backoff_s} must both be >= 0 (0 disables retries / waiting)."
        )


def push_folder_with_retry(
    folder: str | Path,
    repo_id: str,
    repo_type: str = "model",
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload policy with lerobot-ript",
    path_in_repo: str | None = None,
    max_retries: int = 4,
    backoff_s: float = 1.0,
    allow_patterns: Sequence[str] | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed and upload `folder` in one commit, retrying transient Hub failures.

    Attempt k (k = 1 .. 1 + max_retries) waits `backoff_s * 2**(k-1)` seconds after a transient failure
    (HTTP 408/429/5xx, connection error, timeout) before the next attempt. A non-transient failure (401/403/404,
    invalid data) stops at once. Neither raises: the result has `ok=False`, the redacted error and
    `retry_command`. Only invalid arguments raise ValueError, before any network call.

    `token=None` uses the token of the environment (HF_TOKEN or `hf auth login`); `endpoint=None` uses
    HF_ENDPOINT or the public Hub.
    """
    folder = Path(folder)
    _validate_push_args(folder, repo_id, repo_type, max_retries, backoff_s)
    api = HfApi(endpoint=endpoint, token=token)
    retry_command = build_retry_command(
        folder,
        repo_id,
        repo_type,
        path_in_repo=path_in_repo,
        private=private,
        allow_patterns=allow_patterns,
        commit_message=commit_message,
        endpoint=endpoint,
    )
    total_attempts = 1 + max_retries
    error = ""
    for attempt in range(1, total_attempts + 1):
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            commit = api.upload_folder(
                folder_path=folder,
                repo_id=repo_id,
                repo_type=repo_type,
                path_in_repo=path_in_repo,
                commit_message=commit_message,
                allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
            )
        except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as err:
            error = redact_text(f"{type(err).__name__}: {err}", token)
            if not is_transient_error(err):
                logger.error(
                    "Push of %s to %s failed with a non-transient error (not retried): %s",
                    folder,
                    repo_id,
                    error,
                )
                break
            if attempt < total_attempts:
                wait_s = backoff_s * 2 ** (attempt - 1)
                logger.warning(
                    "Push of %s to %s failed on attempt %d/%d (transient): %s. Retrying in %.2f s.",
                    folder,
                    repo_id,
                    attempt,
                    total_attempts,
                    error,
                    wait_s,
                )
                time.sleep(wait_s)
            continue
        logger.info(
            "Pushed %s to %s (%s), attempt %d/%d: %s",
            folder,
            repo_id,
            repo_type,
            attempt,
            total_attempts,
            commit.commit_url,
        )
        return PushResult(
            True, repo_id, repo_type, attempt, commit_url=commit.commit_url, commit_oid=commit.oid
        )
    logger.error(
        "Could not push %s to %s after %d attempt(s): %s. The local folder is intact; push it later with:\n  %s",
        folder,
        repo_id,
        attempt,
        error,
        retry_command,
    )
    return PushResult(False, repo_id, repo_type, attempt, error=error, retry_command=retry_command)


def _success_table(success_history: list[tuple[int, float]] | None) -> str:
    if not success_history:
        return "No evaluation was recorded during training."
    rows = [f"| {int(step)} | {float(rate):.3f} |" for step, rate in sorted(success_history)]
    return "\n".join(["| Step | Success rate |", "|---:|---:|", *rows])


def write_model_card(
    folder: str | Path,
    *,
    repo_id: str,
    train_config: dict,
    success_history: list[tuple[int, float]] | None,
    plot_path: str | Path | None = None,
) -> Path:
    """Write `folder/README.md`: Hub metadata, how to load the policy, the success curve and the config.

    `success_history` holds (training step, success rate in [0, 1]) pairs. `plot_path`, when given, is copied
    into `folder` (if it is not there already) and shown in the card. The config goes through `redact_secrets`,
    and the whole card through `redact_text`, so no token reaches it. Returns the path of README.md.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    front_matter = "\n".join(
        [
            "---",
            "library_name: lerobot",
            "tags:",
            *[f"- {tag}" for tag in MODEL_CARD_TAGS],
            "pipeline_tag: robotics",
            "---",
        ]
    )
    plot = ""
    if plot_path is not None:
        plot_path = Path(plot_path)
        if plot_path.resolve().parent != folder.resolve():
            shutil.copy2(plot_path, folder / plot_path.name)
        plot = f"\n\n![Success rate during training]({plot_path.name})"
    config_json = json.dumps(redact_secrets(train_config), indent=2, default=str)
    card = f"""{front_matter}

# {repo_id}

A [LeRobot](https://github.com/huggingface/lerobot) policy post-trained with RIPT-style reinforcement learning
(RLOO advantages over groups of rollouts, advantage-conditioned flow matching) by `lerobot-ript`.

## How to load it

```python
import lerobot_ript  # registers the "ript" policy type with LeRobot
from lerobot.policies.factory import get_policy_class, make_pre_post_processors

policy = get_policy_class("ript").from_pretrained("{repo_id}")
preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path="{repo_id}")
```

Load the processors too: normalisation lives in them, not in the model.

## Success rate during training

{_success_table(success_history)}{plot}

## Training configuration

Secrets (tokens, passwords, API keys) were removed.

```json
{config_json}
```
"""
    path = folder / "README.md"
    path.write_text(redact_text(card))
    return path
