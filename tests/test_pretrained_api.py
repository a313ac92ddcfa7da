"""The public tokenizer API (``from maetok import MAETok``; ``from_pretrained`` on folders of both formats, run
directories and hub ids; ``save_pretrained``; ``push_to_hub``'s folder), one-line loading errors, and every
tokenizer command on a tiny folder in the authors' released format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_released_tokenizer import authors_config, write_authors_folder
from test_tokenizer import tiny_config

import maetok
from maetok.cli import main
from maetok.config import ConfigError
from maetok.encode import load_tokenizer
from maetok.models.released import ReleasedMAETok
from maetok.models.tokenizer import MAETok
from maetok.runs import weights_fingerprint

IMAGES = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def our_folder(path, **changes):
    torch.manual_seed(0)
    return MAETok(tiny_config(**changes)).save_pretrained(path)


def test_the_package_exports_maetok():
    from maetok import MAETok as exported

    assert exported is MAETok and "MAETok" in maetok.__all__
    with pytest.raises(AttributeError):
        maetok.NotAThing  # noqa: B018


# -- our model folders: one-line errors ----------------------------------------------------------------------


def test_truncated_weights_fail_in_one_line_naming_the_file(tmp_path, capsys):
    folder = our_folder(tmp_path / "tok")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="is not a readable safetensors file") as err:
        MAETok.from_pretrained(folder)
    assert str(weights) in str(err.value) and "\n" not in str(err.value)
    assert main(["reconstruct", "--model", str(folder), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"maetok reconstruct: error: {weights} is not a readable safetensors file" in capsys.readouterr().err


def test_weights_of_another_preset_fail_with_counts_and_names(tmp_path):
    folder = our_folder(tmp_path / "tok")
    other = our_folder(tmp_path / "other", encoder_width=48, decoder_width=48)
    (folder / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError) as err:
        load_tokenizer(folder, "cpu")
    message = str(err.value)
    assert "\n" not in message and str(folder / "model.safetensors") in message
    assert "0 missing" not in message and "mis-shaped (" in message
    count = sum(1 for k, v in MAETok(tiny_config()).state_dict().items()
                if v.shape != load_file(str(other / "model.safetensors"))[k].shape)
    assert f"{count} mis-shaped (decoder." in message


def test_a_config_without_a_field_names_the_file_and_the_field(tmp_path):
    folder = our_folder(tmp_path / "tok")
    config = json.loads((folder / "config.json").read_text())
    del config["encoder_width"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"{folder / 'config.json'} lacks the field 'encoder_width'"):
        MAETok.from_pretrained(folder)


def test_our_format_loads_from_a_run_directory_and_round_trips(tmp_path):
    folder = our_folder(tmp_path / "run" / "model")
    model = MAETok.from_pretrained(tmp_path / "run")
    assert type(model) is MAETok and model.latent_mean is None
    assert weights_fingerprint(model) == weights_fingerprint(MAETok.from_pretrained(folder))


# -- hub ids, offline ----------------------------------------------------------------------------------------


def test_hub_ids_load_the_refs_main_snapshot_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "hub" / "models--MAETok--maetok-b-128"
    stale, main_commit = "0" * 40, "a" * 40  # the stale snapshot sorts first
    write_authors_folder(repo / "snapshots" / stale, config=authors_config(vq_mean=9.0), seed=5)
    write_authors_folder(repo / "snapshots" / main_commit, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main_commit)
    model = MAETok.from_pretrained("MAETok/maetok-b-128")
    assert isinstance(model, ReleasedMAETok) and model.latent_mean == 0.25
    direct = MAETok.from_pretrained(repo / "snapshots" / main_commit)
    assert weights_fingerprint(model) == weights_fingerprint(direct)
    with pytest.raises(FileNotFoundError, match="'MAETok/not-cached' not in the hub cache"):
        MAETok.from_pretrained("MAETok/not-cached")
    # a command on the hub id
    assert main(["info", "--model", "MAETok/maetok-b-128"]) == 0


# -- save_pretrained / push_to_hub / convert / info -----------------------------------------------------------


def test_convert_round_trip_gives_identical_encode_and_decode(tmp_path, capsys):
    source = write_authors_folder(tmp_path / "released", seed=3)
    assert main(["convert", "--from", str(source), "--out", str(tmp_path / "ours")]) == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "maetok" and config["released_architecture"]["latent_std"] == 1.5
    theirs, ours = MAETok.from_pretrained(source), MAETok.from_pretrained(tmp_path / "ours")
    assert type(ours) is ReleasedMAETok and (ours.latent_mean, ours.latent_std) == (0.25, 1.5)
    with torch.no_grad():
        latents = theirs.encode(IMAGES)
        assert torch.equal(latents, ours.encode(IMAGES))
        assert torch.equal(theirs.decode(latents), ours.decode(latents))
    # converting our own format is the identity on the weights
    assert main(["convert", "--from", str(tmp_path / "ours"), "--out", str(tmp_path / "again")]) == 0
    assert weights_fingerprint(MAETok.from_pretrained(tmp_path / "again")) == weights_fingerprint(ours)
    assert main(["convert", "--from", str(source), "--out", str(source)]) == 2
    assert "is the source folder" in capsys.readouterr().err


def test_info_model_prints_format_counts_and_statistics(tmp_path, capsys):
    source = write_authors_folder(tmp_path / "released")
    assert main(["info", "--model", str(source)]) == 0
    out = capsys.readouterr().out
    model = MAETok.from_pretrained(source)
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert "released MAETok, format authors" in out and "-> latents 4 x 6" in out
    assert f"encoder {encoder / 1e6:8.2f}M".replace(" ", "") in out.replace(" ", "")
    assert "scalar mean 0.25, std 1.5" in out and "encoder.mask_token" in out
    assert main(["info", "--model", str(our_folder(tmp_path / "ours"))]) == 0
    out = capsys.readouterr().out
    assert "maetok (maetok), format maetok" in out and "none in the model folder" in out


def test_push_to_hub_uploads_the_save_pretrained_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["model"] = MAETok.from_pretrained(folder_path)
        calls["card"] = (Path(folder_path) / "README.md").read_text()
        return "https://huggingface.co/me/tok/commit/1"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = MAETok.from_pretrained(write_authors_folder(tmp_path / "released"))
    assert model.push_to_hub("me/tok", private=True).endswith("/commit/1")
    assert calls["create"] == ("me/tok", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert weights_fingerprint(calls["model"]) == weights_fingerprint(model)
    assert 'MAETok.from_pretrained("me/tok")' in calls["card"]


# -- every tokenizer command on a released folder --------------------------------------------------------------


def test_commands_on_a_released_folder(image_folder, tmp_path):
    released = write_authors_folder(tmp_path / "released", seed=2)
    rec = tmp_path / "rec"
    assert main(["reconstruct", "--model", str(released), "--input", str(image_folder / "cats"), "--out", str(rec)]) == 0
    assert len(list(rec.glob("*.png"))) == 10  # one output per input: 0.png -> 0.png

    cache = tmp_path / "cache"
    assert main(["cache-latents", "--model", str(released), "--data", str(image_folder), "--out", str(cache)]) == 0
    shard = load_file(str(next(cache.glob("*.safetensors"))))
    stats = json.loads((cache / "stats.json").read_text())
    assert shard["latents"].shape == (19, 4, 6) and stats["num_items"] == 19  # the train split's decodable images
    torch.testing.assert_close(torch.tensor(stats["channel_mean"]), shard["latents"].mean(dim=(0, 1)), rtol=1e-4, atol=1e-5)

    assert main(["eval-recon", "--model", str(released), "--data", str(image_folder), "--num", "2", "--no-fid",
                 "--no-lpips", "--json", str(tmp_path / "recon.json")]) == 0
    recon = json.loads((tmp_path / "recon.json").read_text())  # the held-out split: 1 readable image, 1 broken
    assert recon["num_images"] == 1 and recon["num_skipped_images"] == 1

    ft = tmp_path / "ft"
    assert main(["finetune-decoder", "--from", str(released), "--out", str(ft), f"data.dataset={image_folder}",
                 "finetune.steps=2", "finetune.warmup_steps=1", "loss.perceptual_weight=0", "loss.gan_weight=0",
                 "train.batch_size=4", "train.num_workers=0", "train.eval_every=2", "train.ckpt_every=2",
                 "train.log_every=1", "data.eval_images=4"]) == 0
    before, after = MAETok.from_pretrained(released), MAETok.from_pretrained(ft)
    assert type(after) is ReleasedMAETok and after.latent_mean == before.latent_mean
    for name, tensor in before.state_dict().items():
        if name.startswith("encoder."):  # frozen
            assert torch.equal(tensor, after.state_dict()[name]), name
    assert not torch.equal(before.decoder.head.weight, after.decoder.head.weight)  # the decoder trained

    out = tmp_path / "latents"
    assert main(["analyze-latents", "--model", f"released={released}", "--data", str(image_folder), "--out", str(out),
                 "--num-train", "12", "--num-test", "2", "--ks", "1", "2", "--no-map"]) == 0
    assert "released" in json.loads((out / "latent_analysis.json").read_text())["models"]


def test_a_folder_that_is_no_tokenizer_fails_in_one_line(tmp_path, capsys):
    folder = tmp_path / "sit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 1152, "depth": 28, "vae_1d": True}))
    assert main(["info", "--model", str(folder)]) == 2
    assert f"{folder / 'config.json'} is not a maetok model folder (no model_type;" in capsys.readouterr().err


def test_the_format_is_detected_once_for_every_folder(tmp_path, capsys):
    """model_folders.detect_format tells every format apart from config.json alone; a loader given another kind of
    model (a diffusers component folder, a diffusion model for a tokenizer) says which in one line."""
    from maetok.model_folders import detect_format

    assert detect_format({"model_type": "maetok", "variant": "ae"}) == "maetok-tokenizer"
    assert detect_format({"variant": "ae"}) == "maetok-tokenizer"  # written before model_type existed
    assert detect_format({"model_type": "maetok-diffusion"}) == "maetok-diffusion"
    assert detect_format({"enc_type": "vit", "encoder_model": "x", "codebook_embed_dim": 32,
                          "num_latent_tokens": 128}) == "authors-tokenizer"
    assert detect_format({"hidden_size": 1, "depth": 1, "num_heads": 1, "in_channels": 1, "input_size": 1}) \
        == "authors-sit"
    assert detect_format({"_class_name": "MAETokAutoencoder", "tokenizer_config": {}}) == "diffusers-tokenizer"
    assert detect_format({"_class_name": "MAETokTransformer"}) == "diffusers-diffusion"
    assert detect_format({"_class_name": "MAETokSampler"}) == "diffusers"
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "MAETokAutoencoder", "tokenizer_config": {}}))
    assert main(["info", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json:tokenizer_config lacks the field 'variant'" in err
    (folder / "config.json").write_text(json.dumps({"_class_name": "MAETokSampler"}))
    assert main(["info", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a diffusers model, not a tokenizer (load it with maetok.integrations" in err
