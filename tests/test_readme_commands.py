"""The README's "Use the released weights" commands, run as written on tiny stand-ins of the released checkpoints
served from a fake Hugging Face hub cache (offline), with only the sizes shrunk (50000 samples -> 6, 250 steps -> 2)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
from PIL import Image
from released_standins import TINY, TINY_AUTHORS_CONFIG, put_in_hub_cache, write_authors_folder, write_authors_sit

from maetok.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- released-weights-commands"
SHRINK = {"--num 50000": "--num 6", "--steps 250": "--steps 2"}


def readme_commands() -> list[str]:
    """The ``maetok`` lines of the bash block that follows the marker comment."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(MARKER):], re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip().startswith("maetok ")]


def write_imagenet_like(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("n01440764", "n01443537", "n01484850"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(root / split / name / f"{i}.JPEG")
    return root


def test_the_readme_commands_run_on_released_stand_ins(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    put_in_hub_cache(hub, "MAETok/maetok-b-128", write_authors_folder(tmp_path / "standin-tokenizer"))
    sit_config = {**TINY_AUTHORS_CONFIG, "in_channels": TINY["latent_dim"], "input_size": TINY["latents"]}
    write_authors_sit(tmp_path / "standin-sit", sit_config)
    put_in_hub_cache(hub, "MAETok/sit-xl_maetok-b-128", tmp_path / "standin-sit")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    imagenet = write_imagenet_like(tmp_path / "imagenet")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    reference = (np.random.default_rng(1).random((6, 16, 16, 3)) * 255).astype(np.uint8)
    np.savez(work / "VIRTUAL_imagenet256_labeled.npz", arr_0=reference)

    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["eval-recon", "reconstruct", "sample", "sample", "eval-gen", "eval-gen"]
    for line in commands:
        for big, small in SHRINK.items():
            line = line.replace(big, small)
        argv = shlex.split(line.replace("$IMAGENET", str(imagenet)))
        assert main(argv[1:]) == 0, line

    recon = json.loads((work / "recon.json").read_text())
    assert recon["num_images"] == 9 and recon["rfid"] is not None and recon["psnr"] > 0
    assert len(list((work / "recon").rglob("*.png"))) == 9
    for name in ("cfg", "no-cfg"):
        with np.load(work / "samples" / name / "samples.npz") as npz:
            assert npz["arr_0"].shape == (6, 16, 16, 3) and sorted(npz["arr_1"].tolist()) == [0, 0, 1, 1, 2, 2]
        generation = json.loads((work / f"gen-{name}.json").read_text())
        assert generation["gfid"] > 0 and generation["gfid_num_samples"] == 6
