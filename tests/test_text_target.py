"""The caption (TEXT) auxiliary target: CLIP BPE ids, the 1D-query decoder, the cross-entropy, training."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from maetok.config import TargetConfig, TokenizerTrainConfig, load_config
from maetok.losses.objective import TokenizerObjective
from maetok.models.tokenizer import MAETok, TokenizerOutput, ViTDecoder
from maetok.train.tokenizer import TokenizerTrainer

text = pytest.importorskip("maetok.targets.text")
try:
    text.bpe_vocab_path()
except FileNotFoundError:  # pragma: no cover
    pytest.skip("CLIP BPE vocabulary not installed (pip install --no-deps open_clip_torch==3.3.0)", allow_module_level=True)

from conftest import TINY  # noqa: E402

SOT, EOT, V = 49406, 49407, 49408


@pytest.fixture(scope="module")
def bpe():
    return text.clip_bpe_tokenizer()


def test_known_clip_ids_and_round_trip(bpe):
    # ids checked by decoding through the vocabulary: 320 = "a</w>", 1125 = "photo</w>", 539 = "of</w>",
    # 2368 = "cat</w>", 1929 = "dog</w>" (the values CLIP's own tokenizer gives)
    ids = bpe.encode("a photo of a cat", context_length=10)
    assert ids.dtype == torch.long and ids.shape == (1, 10)
    assert ids[0].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT, 0, 0, 0]
    assert [bpe.decoder[i] for i in (320, 1125, 539, 2368, 1929)] == ["a</w>", "photo</w>", "of</w>", "cat</w>", "dog</w>"]
    # lowercasing and whitespace cleanup
    assert bpe.encode("  A   Photo of a DOG ")[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 1929, EOT]
    assert bpe.vocab_size == V and bpe.encoder["<|endoftext|>"] == EOT
    for sentence in ("a photo of a cat", "two dogs playing in the snow, 2024!", "café au lait"):
        assert bpe.decode(bpe.encode(sentence)[0]).replace(" ", "") == sentence.replace(" ", "")


def test_padding_and_truncation(bpe):
    ids = bpe.encode(["a cat", "", "a photo of a cat"], context_length=5)
    assert ids.shape == (3, 5)
    assert ids[0].tolist() == [SOT, 320, 2368, EOT, 0]
    assert ids[1].tolist() == [SOT, EOT, 0, 0, 0]
    assert ids[2].tolist() == [SOT, 320, 1125, 539, EOT]  # cut, still ends with EOT
    with pytest.raises(ValueError, match="context_length"):
        bpe.encode("a", context_length=1)


def test_missing_vocab_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("MAETOK_BPE_VOCAB", str(tmp_path / "nope.txt.gz"))
    with pytest.raises(FileNotFoundError, match="MAETOK_BPE_VOCAB"):
        text.bpe_vocab_path()
    monkeypatch.delenv("MAETOK_BPE_VOCAB")
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="open_clip_torch==3.3.0"):
        text.bpe_vocab_path()


def tiny_model_config(context_length=6):
    cfg = load_config(TokenizerTrainConfig, "fashion-mnist-maetok", TINY + ["model.mask_ratio_min=0.0", "model.mask_ratio_max=0.0"])
    cfg.model.aux_targets = [TargetConfig("text", 1.0, "mse", {"context_length": context_length})]
    return cfg


def test_text_decoder_shape():
    cfg = tiny_model_config().model
    decoder = ViTDecoder(cfg, 32, 1, 2, out_dim=V, num_queries=6)
    logits = decoder(torch.randn(3, cfg.num_latent_tokens, cfg.latent_dim), cfg.grid_size)
    assert logits.shape == (3, 6, V)
    assert not hasattr(ViTDecoder(cfg, 32, 1, 2, out_dim=5), "query_pos_embed")  # the 2D mode is unchanged
    model = MAETok(cfg, {"text": V}, {"text": 6})
    out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.aux_predictions["text"].shape == (2, 6, V)
    assert all(not k.startswith("aux_") for k in model.inference_state_dict())


def test_cross_entropy_ignores_padding_and_empty_captions():
    ids = torch.tensor([[SOT, 5, EOT, 0, 0], [SOT, EOT, 0, 0, 0]])
    a = 2.0
    logits = torch.zeros(2, 5, V)
    logits[0, 1, 5] = a
    # by hand: positions (0,1) -> 5 and (0,2) -> EOT; SOT, padding and the empty caption are ignored
    expected = 0.5 * ((math.log(math.exp(a) + V - 1) - a) + math.log(V))
    loss = text.caption_cross_entropy(logits, ids)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    noisy = logits.clone()
    noisy[1] = torch.randn(5, V)  # the empty caption's row
    noisy[0, 3:] = torch.randn(2, V)  # padding positions
    noisy[0, 0] = torch.randn(V)  # the SOT position
    assert text.caption_cross_entropy(noisy, ids).item() == pytest.approx(expected, rel=1e-5)
    assert text.caption_cross_entropy(logits[1:], ids[1:]).item() == 0.0
    target = text.build_text_target(context_length=5)
    objective = TokenizerObjective(tiny_model_config().loss, {"text": target}, [TargetConfig("text", 0.5)], "maetok")
    images = torch.zeros(2, 3, 16, 16)
    out = TokenizerOutput(images, (4, 4), torch.zeros(2, 4, 4), None, {"text": logits})
    total, logs = objective.generator_loss(out, images, 0, captions=ids)
    assert logs["aux_text"] == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(0.5 * expected + logs["mse"], rel=1e-5)
    with pytest.raises(ValueError, match="captions"):
        objective.generator_loss(out, images, 0)


@pytest.fixture
def captioned_folder(tmp_path):
    root = tmp_path / "captioned"
    root.mkdir()
    rng = np.random.default_rng(0)
    captions = ["a photo of a cat", "a red car on a road", "two dogs in the snow", ""]
    for i in range(60):  # enough for a non-empty hash-held-out test split
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
        if captions[i % 4]:
            (root / f"{i}.txt").write_text(captions[i % 4])
    return root


def test_trainer_runs_with_captions(captioned_folder, tmp_path):
    cfg = tiny_model_config()
    cfg.data.dataset = str(captioned_folder)
    cfg.train.steps = 3
    cfg.model.mask_ratio_min, cfg.model.mask_ratio_max = 0.4, 0.6
    trainer = TokenizerTrainer(cfg, tmp_path / "run")
    assert trainer.uses_captions and len(trainer.train_set[0]) == 3
    assert trainer.model.aux_decoders["text"].num_queries == 6
    trainer.fit()
    rows = (tmp_path / "run" / "log.csv").read_text().strip().splitlines()
    assert "aux_text" in rows[0] and len(rows) == 1 + 3
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    cfg.data.dataset = "fashion-mnist"
    with pytest.raises(ValueError, match="captions"):
        TokenizerTrainer(cfg, tmp_path / "fmnist")


def test_text_loss_falls_when_overfitting():
    torch.manual_seed(0)
    cfg = tiny_model_config(context_length=8)
    target = text.build_text_target(context_length=8)
    model = MAETok(cfg.model, {"text": V}, {"text": 8})
    objective = TokenizerObjective(cfg.loss, {"text": target}, cfg.model.aux_targets, "maetok")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = target.tokenize(["a photo of a cat", "a red car"])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        out = model(images)
        total, logs = objective.generator_loss(out, images, step, captions=ids)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(logs["aux_text"])
    assert losses[0] > math.log(V) - 1.5
    assert losses[-1] < 0.2 * losses[0]
