"""Issue 21, point 5 (a researcher's first day): long steps show a bar, labels say what is true (info on a diffusion
preset, bench's defaults, resume and discriminator messages, the held-out count, eval-gen's reference and IS),
reconstruct's outputs, and decode's range."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_SIT, StubInception, tiny_cfg
from PIL import Image

from maetok.cli import build_parser, main
from maetok.config import DIFFUSION_SIZES, DiffusionTrainConfig, TokenizerConfig, TokenizerTrainConfig, \
    TransformerSize, list_presets, load_config, read_preset
from maetok.demo import DIFFUSION_CONFIG, TOKENIZER_CONFIG
from maetok.models.tokenizer import MAETok

README = Path(__file__).resolve().parents[1] / "README.md"


def _save_noise(path: Path, height: int, width: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = TokenizerConfig(variant="ae", image_size=16, in_channels=3, patch_size=4, encoder_width=32, encoder_depth=1,
                          encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2, num_latent_tokens=4,
                          latent_dim=4, aux_targets=[], mask_ratio_min=0.0, mask_ratio_max=0.0)
    path = tmp_path_factory.mktemp("tok") / "model"
    MAETok(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def split_root(tmp_path_factory) -> Path:
    """An ImageNet-style root: 10 training images and 3 held-out ones (val/), one class."""
    root = tmp_path_factory.mktemp("split")
    for i in range(10):
        _save_noise(root / "train" / "a" / f"{i}.png", 16, 16, i)
    for i in range(3):
        _save_noise(root / "val" / "a" / f"{i}.png", 16, 16, 100 + i)
    return root


# -- progress bars ------------------------------------------------------------------------------------------------


def test_the_reconstruction_metrics_and_the_baselines_show_bars_with_rate_and_eta(capsys):
    from maetok.eval.baselines import compute_baselines
    from maetok.eval.reconstruction import ReconstructionEvaluator

    images = torch.rand(12, 3, 16, 16) * 2 - 1
    evaluator = ReconstructionEvaluator(StubInception(), lpips=False, progress=True)
    evaluator.update(images, images.flip(-1))
    bar = capsys.readouterr().err
    assert "reconstruction metrics" in bar and "12/12" in bar and "img/s" in bar  # count, rate (ETA while running)
    silent = ReconstructionEvaluator(StubInception(), lpips=False)
    silent.update(images, images.flip(-1))
    assert "reconstruction metrics" not in capsys.readouterr().err
    assert silent.result() == evaluator.result()  # a bar changes no number

    train = torch.rand(40, 3, 16, 16) * 2 - 1
    quiet = compute_baselines(train, None, images, 4, StubInception(), lpips=False)
    assert capsys.readouterr().err == ""
    shown = compute_baselines(train, None, images, 4, StubInception(), lpips=False, progress=True)
    err = capsys.readouterr().err
    assert "reconstruction metrics" in err and "samples" in err and "img/s" in err
    assert shown["gaussian"]["gfid"] == quiet["gaussian"]["gfid"] and shown["pca"]["rfid"] == quiet["pca"]["rfid"]


def test_the_latent_analysis_gmm_curve_shows_a_bar(capsys):
    from maetok.pipeline import gmm_curve

    fit, test = torch.randn(60, 4, 2), torch.randn(20, 4, 2)
    quiet = gmm_curve(fit, test, (1, 2))
    assert "GMM" not in capsys.readouterr().err
    shown = gmm_curve(fit, test, (1, 2), progress=True)
    assert "GMM" in capsys.readouterr().err and shown == quiet


# -- maetok info, presets, bench ------------------------------------------------------------------------------------


def test_info_on_a_diffusion_preset_invents_no_latents(capsys):
    from maetok.models.sit import build_diffusion_model

    assert main(["info", "--config", DIFFUSION_CONFIG]) == 0
    out = capsys.readouterr().out
    model = load_config(DiffusionTrainConfig, DIFFUSION_CONFIG).model
    assert f"{model.size_name} (width {model.width}, depth {model.depth}" in out
    assert "come from the latent cache at train time" in out and "--latent-shape L H --classes N" in out
    assert "128 x 32" not in out and "1000 classes" not in out

    assert main(["info", "--config", DIFFUSION_CONFIG, "--latent-shape", "16", "8", "--classes", "10"]) == 0
    out = capsys.readouterr().out
    built = build_diffusion_model(model.for_latents((16, 8), 10))
    count = sum(p.numel() for p in built.parameters()) + sum(b.numel() for b in built.buffers())
    assert "on 16 x 8 latents, 10 classes" in out and f"{count / 1e6:8.2f}M" in out


def test_no_preset_names_a_size_it_does_not_have():
    demo_sit = load_config(DiffusionTrainConfig, DIFFUSION_CONFIG).model
    assert demo_sit.size_name == "custom size" and (demo_sit.width, demo_sit.depth) == (192, 4)
    for name in list_presets():
        raw = read_preset(name).get("model", {})
        if "arch" in raw and "preset" in raw:
            m = load_config(DiffusionTrainConfig, name).model
            assert DIFFUSION_SIZES[raw["preset"]] == TransformerSize(m.width, m.depth, m.num_heads), name


def test_bench_help_shows_its_defaults_and_its_latents_are_the_tokenizers(capsys):
    from maetok.bench import tokenizer_latent_shape

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: all)", f"default: {TOKENIZER_CONFIG}", f"default: {DIFFUSION_CONFIG}", "(default: 10)",
                  "(default: 64)", "(default: 250)", "(default: those of --tokenizer-preset)"):
        assert shown in text, shown
    assert build_parser().parse_args(["bench"]).latent_shape is None
    m = load_config(TokenizerTrainConfig, TOKENIZER_CONFIG).model
    assert tokenizer_latent_shape(TOKENIZER_CONFIG, []) == (m.num_latent_tokens, m.latent_dim)


# -- resume and discriminator messages ---------------------------------------------------------------------------


def test_a_fresh_pipeline_run_is_not_a_resume_and_an_empty_resume_says_so(image_folder, tmp_path, monkeypatch, capsys):
    from maetok.pipeline import train_tokenizer
    from maetok.study import QUICK_BUDGET
    from maetok.train.tokenizer import TokenizerTrainer

    calls = []

    class Recorder:
        def __init__(self, cfg, out_dir, stage="pretrain", resume=False, **kwargs):
            calls.append((Path(out_dir).name, resume))

        def fit(self):
            pass

    monkeypatch.setattr("maetok.train.tokenizer.TokenizerTrainer", Recorder)
    train_tokenizer(tmp_path / "fresh", str(image_folder), TOKENIZER_CONFIG, QUICK_BUDGET, TINY)
    assert calls == [("stage1", False), ("tokenizer", False)]  # nothing there: a new run, not a "--resume"
    calls.clear()
    (tmp_path / "fresh" / "stage1").mkdir(parents=True)
    (tmp_path / "fresh" / "stage1" / "log.csv").write_text("step\n")  # an interrupted stage 1: continued
    train_tokenizer(tmp_path / "fresh", str(image_folder), TOKENIZER_CONFIG, QUICK_BUDGET, TINY)
    assert calls == [("stage1", True), ("tokenizer", False)]
    monkeypatch.undo()

    capsys.readouterr()
    no_gan = ("loss.perceptual_weight=0", "loss.gan_weight=0")
    TokenizerTrainer(tiny_cfg(image_folder, *no_gan), tmp_path / "empty", resume=True)  # --resume, empty folder
    out = capsys.readouterr().out
    assert "nothing to resume: no checkpoint at" in out and "--resume" not in out


def test_the_discriminator_warm_up_is_said_as_configured(tmp_path):
    from maetok.demo import QUICK, discriminator_sentence
    from maetok.pipeline import tokenizer_configs
    from maetok.train.tokenizer import new_discriminator_schedule

    assert "alone for the first 40 steps" in new_discriminator_schedule(40)
    none = new_discriminator_schedule(0)
    assert "no warm-up" in none and "alone" not in none and "0 steps" not in none
    stage2 = tokenizer_configs("fashion-mnist", TOKENIZER_CONFIG, QUICK)[1]
    assert stage2.finetune.disc_warmup_steps == QUICK.stage2_steps // 5 == 0  # the quick demo: no warm-up
    # without a stage-1 discriminator the report says what the trainer printed, with the stage-2 config's count
    (tmp_path / "stage1").mkdir()
    assert discriminator_sentence(tmp_path / "stage1", stage2) == none


# -- the held-out count of the convergence check -----------------------------------------------------------------


def test_the_convergence_check_names_the_images_it_was_measured_on(split_root, tmp_path):
    from maetok.demo import _convergence_sentence
    from maetok.pipeline import convergence
    from maetok.train.tokenizer import TokenizerTrainer

    cfg = tiny_cfg(split_root, "train.steps=4", "train.eval_every=2", "data.eval_images=256",
                   "loss.perceptual_weight=0", "loss.gan_weight=0")
    TokenizerTrainer(cfg, tmp_path / "run").fit()
    c = convergence(tmp_path / "run" / "log.csv")
    assert c["num_images"] == 3  # the held-out split holds 3 images, not the 256 asked for
    sentence = _convergence_sentence(c)
    assert "(3 test images)" in sentence and "256" not in sentence
    old_log = tmp_path / "old.csv"  # a log written before the count was logged: no count, no invented one
    old_log.write_text("step,eval_psnr\n1,10.0\n2,11.0\n")
    assert convergence(old_log)["num_images"] is None and "test images" not in _convergence_sentence(convergence(old_log))


# -- eval-gen: which reference images, and the Inception Score ----------------------------------------------------


def test_eval_gen_says_which_reference_images_it_used_and_why_is_is_null(split_root, tmp_path, monkeypatch, capsys):
    samples = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    monkeypatch.setattr("maetok.eval.inception.load_fid_network",
                        lambda inception=None, device=None, weights=None: (StubInception(with_logits=False), None))
    assert main(["eval-gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(split_root)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout stays one JSON document
    assert f"8 samples against all of the 3 images of the test split of {split_root}" in captured.err
    assert "Inception Score not computed" in captured.err and "1008-way classifier" in captured.err
    assert result["inception_score"] is None and any("fewer than the 8 samples" in n for n in result["notes"])

    assert main(["eval-gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(split_root),
                 "--ref-split", "train"]) == 0
    err = capsys.readouterr().err
    assert f"a seeded draw (seed 0) of 8 of the 10 images of the train split of {split_root}" in err


def test_the_readme_says_where_is_needs_a_classifier():
    text = " ".join(README.read_text().split())
    row = next(line for line in text.split("| `maetok ") if line.startswith("eval-gen"))
    assert "--ref-split" in row and "1008-way classifier" in row and "packaged" in row


# -- reconstruct --------------------------------------------------------------------------------------------------


def test_reconstruct_names_outputs_plainly_can_write_the_reconstruction_alone_and_says_what_it_resized(
        tokenizer_dir, tmp_path, capsys):
    source = tmp_path / "in"
    _save_noise(source / "photo.jpg", 60, 100, 0)  # 100x60: resized and cropped to 16x16
    _save_noise(source / "b.png", 16, 16, 1)
    _save_noise(source / "sub" / "c.png", 16, 16, 2)
    _save_noise(source / "sub" / "c.jpg", 16, 16, 3)  # shares the stem of c.png: both keep their extension
    assert main(["reconstruct", "--model", str(tokenizer_dir), "--input", str(source), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["b.png", "photo.png", "sub/c.jpg.png", "sub/c.png.png"]
    assert "1 of 4 inputs were resized (shorter side) and center-cropped to the model's 16x16: 100x60 (1)" in out
    with Image.open(tmp_path / "out" / "b.png") as pair:
        assert pair.size == (2 * 16 + 3 * 2, 16 + 2 * 2)  # original | reconstruction

    assert main(["reconstruct", "--model", str(tokenizer_dir), "--input", str(source / "b.png"), "--out",
                 str(tmp_path / "alone"), "--recon-only"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 reconstruction PNGs" in out and "resized" not in out  # already the model's size: no line
    with Image.open(tmp_path / "alone" / "b.png") as alone:
        assert alone.size == (16, 16)

    # an output that would replace an input is refused, in one line, before anything is written
    assert main(["reconstruct", "--model", str(tokenizer_dir), "--input", str(source), "--out", str(source)]) == 2
    assert "would replace the input image" in capsys.readouterr().err
    assert sorted(p.name for p in source.rglob("*")) == ["b.png", "c.jpg", "c.png", "photo.jpg", "sub"]


# -- decode's range -----------------------------------------------------------------------------------------------


def test_decode_keeps_the_raw_output_and_images_are_clamped(tokenizer_dir):
    from maetok.data.images import to_uint8
    from maetok.encode import reconstruct_images

    model = MAETok.from_pretrained(tokenizer_dir).eval()
    with torch.no_grad():
        model.decoder.head.weight.mul_(50.0)  # an overshooting decoder
        images = torch.rand(2, 3, 16, 16) * 2 - 1
        raw = model.decode(model.encode(images))
    assert raw.min() < -1 and raw.max() > 1  # the raw tensor, as diffusers' decode returns it
    clamped = reconstruct_images(model, images)
    assert clamped.min() >= -1 and clamped.max() <= 1
    assert torch.equal(to_uint8(raw), to_uint8(raw.clamp(-1, 1)))
    assert "not clamped" in MAETok.decode.__doc__


def test_the_readme_names_the_image_helpers():
    text = " ".join(README.read_text().split())
    for name in ("maetok.data.load_image", "maetok.data.to_tensor", "not clamped"):
        assert name in text, name
    assert re.search(r"`reconstruct` writes one output per input \(`a\.jpg` -> `a\.png`", text)


# -- the demo end to end: its messages and bars -------------------------------------------------------------------


def test_the_quick_demo_shows_bars_in_every_long_phase_and_says_only_true_things(tmp_path, capsys):
    from maetok.demo import run_demo
    from maetok.train.tokenizer import new_discriminator_schedule

    root = tmp_path / "data"
    for offset, cls in ((0, "a"), (100, "b")):
        for i in range(40):
            _save_noise(root / "train" / cls / f"{i}.png", 20, 20, offset + i)
        for i in range(4):
            _save_noise(root / "val" / cls / f"{i}.png", 20, 20, 1000 + offset + i)
    tiny = ("model.patch_size=4", "model.encoder_width=32", "model.encoder_depth=1", "model.encoder_heads=2",
            "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2", "model.aux_width=32",
            "model.aux_heads=2", "model.aux_depth=1", "model.num_latent_tokens=4", "model.latent_dim=4",
            "train.batch_size=8")
    report = run_demo(tmp_path / "demo", quick=True, inception=StubInception(), data=str(root), image_size=16,
                      tokenizer_extra=tiny, diffusion_extra=tuple(TINY_SIT)).read_text()
    captured = capsys.readouterr()
    assert "--resume" not in captured.out  # a fresh run resumes nothing
    warm_up = new_discriminator_schedule(0)  # the quick budget's stage 2: 2 steps, 2 // 5 = 0 of warm-up
    assert warm_up in captured.out and warm_up in " ".join(report.split())
    assert "(8 test images)" in report and "256 test images" not in report  # val/ holds 8
    for bar in ("reconstruction metrics", "sample", "samples", "linear probe", "GMM"):  # every long phase
        assert re.search(rf"{bar}[^\n\r]*it/s|{bar}[^\n\r]*img/s|{bar}[^\n\r]*batch/s|{bar}[^\n\r]*s/it",
                         captured.err), bar
