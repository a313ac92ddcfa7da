"""Hub ids resolve through huggingface_hub, offline, to the snapshot that ``refs/main`` names."""

from __future__ import annotations

import pytest

from maetok.assets import find_hf_snapshot, is_hub_id, resolve_pretrained


def fake_hub_cache(root, repo_id: str, snapshots: dict[str, str], main: str):
    """A hub cache holding ``repo_id`` with one folder per commit hash (config.json content) and refs/main."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    for commit, text in snapshots.items():
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return repo


def test_hub_id_resolves_to_the_refs_main_snapshot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # "0000..." sorts first: a walker taking the first snapshot by name would pick the stale one
    old, new = "0" * 40, "f" * 40
    fake_hub_cache(tmp_path, "MAETok/maetok-b-128", {old: '{"v": "old"}', new: '{"v": "new"}'}, main=new)
    folder = resolve_pretrained("MAETok/maetok-b-128")
    assert folder.name == new and (folder / "config.json").read_text() == '{"v": "new"}'
    assert find_hf_snapshot("MAETok/maetok-b-128") == folder


def test_local_folder_wins_and_unknown_sources_fail_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = tmp_path / "owner" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not is_hub_id("owner/name") and resolve_pretrained("owner/name").resolve() == local.resolve()
    assert is_hub_id("someone/not-cached")
    with pytest.raises(FileNotFoundError, match="'someone/not-cached' not in the hub cache") as err:
        resolve_pretrained("someone/not-cached")
    assert "\n" not in str(err.value)
    assert find_hf_snapshot("someone/not-cached") is None
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hugging Face hub id"):
        resolve_pretrained("./no/such/dir")
