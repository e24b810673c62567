"""Hub pushes and the model card, against a real local Hub server (tests/hub_server.py) and the real client.

huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET at import, and another module may have imported it
before this one. So the client runs in this process with the endpoint passed explicitly
(`push_folder_with_retry(endpoint=...)`, `snapshot_download(endpoint=...)`) and the Xet switch set on
`huggingface_hub.constants` (read at every upload); only the `hf` CLI check runs in a subprocess with env vars.
"""

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from hub_server import LocalHubServer
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

from lerobot_ript.train.hub import (
    REDACTED,
    PushResult,
    build_retry_command,
    is_transient_error,
    push_folder_with_retry,
    redact_secrets,
    write_model_card,
)

TOKEN = "hf_FAKEtoken1234567890"
REPO = "ript-user/ript-policy"
FAST = {"token": TOKEN, "backoff_s": 0.01}


@pytest.fixture(autouse=True)
def _local_hub_client(monkeypatch):
    # Without this the client uploads through Xet, which only the real Hub serves.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # tests/conftest.py sets HF_HUB_OFFLINE=1 so that no test reaches the network; these tests reach only the
    # server on 127.0.0.1 (every call gets its endpoint explicitly) and send no telemetry.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture
def policy_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "pretrained_model"
    (folder / "extra").mkdir(parents=True)
    (folder / "config.json").write_text('{"type": "ript", "chunk_size": 4}')
    # .safetensors is an LFS pattern in the server's default .gitattributes: exercises batch + PUT + lfsFile.
    (folder / "model.safetensors").write_bytes(os.urandom(64 * 1024))
    (folder / "extra" / "notes.txt").write_text("regular file in a sub-folder\n")
    write_model_card(
        folder, repo_id=REPO, train_config={"hub_token": TOKEN, "lr": 1e-4}, success_history=[(0, 0.5)]
    )
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_push_round_trip_uses_lfs_and_sends_token_only_in_authorization(policy_folder, tmp_path):
    with LocalHubServer() as hub:
        result = push_folder_with_retry(policy_folder, REPO, endpoint=hub.endpoint, **FAST)
        assert result.ok and result.attempts == 1 and result.error is None and result.retry_command is None
        assert hub.counts["lfs_put"] == 1  # the .safetensors went through the LFS batch + PUT path

        local = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "cache", token=TOKEN)
        downloaded = _files(Path(local))
        assert downloaded.pop(".gitattributes")  # created with the repo, as on the Hub
        assert downloaded == _files(policy_folder)
        tree = {f.path: f for f in HfApi(endpoint=hub.endpoint).list_repo_tree(REPO, recursive=True)}
        assert tree["model.safetensors"].lfs is not None and tree["config.json"].lfs is None

        # Pushing the unchanged folder again re-uploads nothing.
        again = push_folder_with_retry(policy_folder, REPO, endpoint=hub.endpoint, **FAST)
        assert again.ok and hub.counts["lfs_put"] == 1 and hub.counts["commit"] == 1

        assert hub.token_leaks(TOKEN) == []
        auth = [r.headers.get("authorization") for r in hub.requests if r.path == "/api/repos/create"]
        assert auth and all(a == f"Bearer {TOKEN}" for a in auth)


def test_dataset_push_round_trip_into_subfolder(tmp_path):
    folder = tmp_path / "episodes"
    folder.mkdir()
    (folder / "data.parquet").write_bytes(os.urandom(4096))
    (folder / "info.json").write_text('{"fps": 10}')
    with LocalHubServer() as hub:
        result = push_folder_with_retry(
            folder, REPO, "dataset", path_in_repo="meta", endpoint=hub.endpoint, **FAST
        )
        assert result.ok and "/datasets/" in result.commit_url
        assert not HfApi(endpoint=hub.endpoint).repo_exists(REPO)  # a model repo of that name was not created

        local = snapshot_download(REPO, repo_type="dataset", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
        assert _files(Path(local) / "meta") == _files(folder)
        one = hf_hub_download(
            REPO, "meta/info.json", repo_type="dataset", endpoint=hub.endpoint, cache_dir=tmp_path / "d"
        )
        assert Path(one).read_text() == '{"fps": 10}'


def test_transient_failures_are_retried_until_the_push_succeeds(policy_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lerobot_ript.train.hub")
    with LocalHubServer(fail_first_n=2) as hub:
        result = push_folder_with_retry(policy_folder, REPO, endpoint=hub.endpoint, max_retries=4, **FAST)
        assert result.ok and result.attempts == 3
        assert (
            hub.counts["injected_failures"] == 2 and hub.counts["create"] == 3 and hub.counts["commit"] == 1
        )
        retries = [
            r for r in caplog.records if r.levelno == logging.WARNING and "transient" in r.getMessage()
        ]
        assert len(retries) == 2
        local = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
        assert (Path(local) / "model.safetensors").read_bytes() == (
            policy_folder / "model.safetensors"
        ).read_bytes()
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("outage", ["always_503", "closed_port"])
def test_hub_down_returns_retry_command_without_raising_or_leaking_token(outage, policy_folder, caplog):
    caplog.set_level(logging.DEBUG)
    with LocalHubServer(fail_first_n=10**9) as hub:
        endpoint = hub.endpoint if outage == "always_503" else f"http://127.0.0.1:{_free_port()}"
        result = push_folder_with_retry(
            policy_folder, REPO, endpoint=endpoint, max_retries=2, commit_message="RL step 400", **FAST
        )
        assert isinstance(result, PushResult) and not result.ok and result.attempts == 3
        assert ("503" in result.error) if outage == "always_503" else ("Connect" in result.error)
        if outage == "always_503":
            assert hub.counts["create"] == 3 and hub.counts["commit"] == 0
        expected = (
            f"HF_ENDPOINT={endpoint} HF_HUB_DISABLE_XET=1 hf upload {REPO} {policy_folder.resolve()} "
            "--repo-type model --commit-message 'RL step 400'"
        )
        assert result.retry_command == expected
        assert result.retry_command in caplog.text
        for text in (repr(result), caplog.text, (policy_folder / "README.md").read_text()):
            assert TOKEN not in text
        assert hub.token_leaks(TOKEN) == []


@pytest.mark.parametrize(
    ("endpoint", "env_endpoint", "prefix"),
    [
        (None, "http://127.0.0.1:9/", "HF_ENDPOINT=http://127.0.0.1:9 "),  # from HF_ENDPOINT: carried
        ("http://hub.local:8080", "https://huggingface.co", "HF_ENDPOINT=http://hub.local:8080 "),
        (None, "https://huggingface.co", ""),  # the public Hub needs no prefix
        ("https://huggingface.co/", "http://127.0.0.1:9", ""),
    ],
)
def test_retry_command_names_any_non_public_server(
    monkeypatch, policy_folder, endpoint, env_endpoint, prefix
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", env_endpoint.rstrip("/"))  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    command = build_retry_command(policy_folder, REPO, endpoint=endpoint)
    assert command == f"{prefix}hf upload {REPO} {policy_folder.resolve()} --repo-type model"


def test_retry_command_pushes_once_the_hub_is_back(policy_folder, tmp_path):
    with LocalHubServer(fail_first_n=10**9) as hub:
        result = push_folder_with_retry(policy_folder, REPO, endpoint=hub.endpoint, max_retries=0, **FAST)
        assert not result.ok
        hub.fail_first_n = 0  # the Hub recovers
        env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "TRANSFORMERS_OFFLINE")}
        env |= {"HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        env |= {"HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's `hf`
        run = subprocess.run(
            ["bash", "-c", result.retry_command], env=env, capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 0, run.stderr
        local = snapshot_download(REPO, endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
        assert (Path(local) / "model.safetensors").read_bytes() == (
            policy_folder / "model.safetensors"
        ).read_bytes()
        assert hub.token_leaks(TOKEN) == []


def test_non_transient_error_is_not_retried(policy_folder, caplog):
    with LocalHubServer(fail_first_n=10**9, fail_status=403) as hub:
        result = push_folder_with_retry(policy_folder, REPO, endpoint=hub.endpoint, max_retries=4, **FAST)
        assert not result.ok and result.attempts == 1 and "403" in result.error
        assert hub.counts["create"] == 1
        assert "non-transient" in caplog.text and TOKEN not in caplog.text


@pytest.mark.parametrize(
    ("err", "transient"),
    [
        (HfHubHTTPError("x", response=httpx.Response(503, request=httpx.Request("POST", "http://h"))), True),
        (HfHubHTTPError("x", response=httpx.Response(429, request=httpx.Request("POST", "http://h"))), True),
        (HfHubHTTPError("x", response=httpx.Response(401, request=httpx.Request("POST", "http://h"))), False),
        (HfHubHTTPError("x", response=httpx.Response(404, request=httpx.Request("POST", "http://h"))), False),
        (httpx.ConnectError("refused"), True),
        (httpx.ReadTimeout("slow"), True),
        (ValueError("bad metadata"), False),
    ],
)
def test_is_transient(err, transient):
    assert is_transient_error(err) is transient


def test_invalid_arguments_raise_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        push_folder_with_retry(tmp_path / "missing", REPO, endpoint="http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"\['model', 'dataset'\]"):
        push_folder_with_retry(tmp_path, REPO, "space", endpoint="http://127.0.0.1:9")


def test_redact_secrets_drops_secret_keys_and_masks_token_values():
    config = {
        "lr": 3e-4,
        "HF_TOKEN": "x",
        "wandb": {"api_key": "k", "project": "ript", "notes": f"pushed with {TOKEN}"},
        "db_password": "p",
        "client-secret": "s",
        "runs": [{"hub_token": "t", "repo": "a/b"}, ("keep", TOKEN)],
        "short": "hf_abc",  # too short to be a token
    }
    assert redact_secrets(config) == {
        "lr": 3e-4,
        "wandb": {"project": "ript", "notes": f"pushed with {REDACTED}"},
        "runs": [{"repo": "a/b"}, ("keep", REDACTED)],
        "short": "hf_abc",
    }


def test_model_card_has_metadata_loading_instructions_success_table_and_no_token(tmp_path):
    plot = tmp_path / "success.png"
    plot.write_bytes(b"\x89PNG fake")
    config = {"policy": {"type": "ript"}, "hub": {"token": TOKEN, "repo_id": REPO}, "notes": f"token={TOKEN}"}
    card_path = write_model_card(
        tmp_path / "out",
        repo_id=REPO,
        train_config=config,
        success_history=[(200, 0.5), (0, 0.25)],
        plot_path=plot,
    )
    card = card_path.read_text()
    assert card_path == tmp_path / "out" / "README.md" and (tmp_path / "out" / "success.png").exists()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta == {
        "library_name": "lerobot",
        "tags": ["lerobot", "ript", "robotics", "reinforcement-learning"],
        "pipeline_tag": "robotics",
    }
    assert "import lerobot_ript" in card and "from lerobot.policies.factory import get_policy_class" in card
    assert f'get_policy_class("ript").from_pretrained("{REPO}")' in card
    assert f'make_pre_post_processors(policy.config, pretrained_path="{REPO}")' in card
    assert "| Step | Success rate |\n|---:|---:|\n| 0 | 0.250 |\n| 200 | 0.500 |" in card
    assert "![Success rate during training](success.png)" in card
    assert TOKEN not in card and '"token"' not in card and '"repo_id": "ript-user/ript-policy"' in card


def test_model_card_without_history(tmp_path):
    card = write_model_card(tmp_path, repo_id=REPO, train_config={}, success_history=None).read_text()
    assert "No evaluation was recorded" in card and "| Step |" not in card


def test_local_hub_server_serves_tags_revisions_and_delete(policy_folder, tmp_path):
    """The fake Hub itself: what the client needs beyond a push (so later tests can rely on it)."""
    with LocalHubServer() as hub:
        api = HfApi(endpoint=hub.endpoint, token=TOKEN)
        assert api.create_repo(REPO) == api.create_repo(REPO, exist_ok=True)  # 409 carries the url
        first = api.upload_folder(folder_path=policy_folder, repo_id=REPO)
        api.create_tag(REPO, tag="v1")
        (policy_folder / "config.json").write_text('{"type": "ript", "chunk_size": 8}')
        second = api.upload_folder(folder_path=policy_folder, repo_id=REPO)
        assert first.oid != second.oid and api.repo_info(REPO).sha == second.oid

        def config_at(rev: str) -> str:
            path = hf_hub_download(
                REPO, "config.json", revision=rev, endpoint=hub.endpoint, cache_dir=tmp_path
            )
            return Path(path).read_text()

        assert '"chunk_size": 4' in config_at("v1") and '"chunk_size": 4' in config_at(first.oid)
        assert '"chunk_size": 8' in config_at("main")
        api.delete_repo(REPO)
        assert not api.repo_exists(REPO)
