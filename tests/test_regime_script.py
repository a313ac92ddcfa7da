"""scripts/regime.py: run names read as grid points, stage 1 is shared by the stage 2s that start from it, and a
tiny run goes through both stages into the results file and the report."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import TINY

from maetok.config import TokenizerTrainConfig, load_config
from maetok.pipeline import tokenizer_configs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "regime.py"


@pytest.fixture(scope="module")
def regime():
    spec = importlib.util.spec_from_file_location("regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["regime"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("regime", None)


def test_run_names_read_as_grid_points(regime):
    point = regime.GridPoint.parse("p4_m10-40_s2000_paper25_seed2")
    assert (point.patch, point.tokenizer, point.mask, point.stage1_steps) == (4, "maetok", (0.1, 0.4), 2000)
    assert (point.stage2_mode, point.stage2_steps, point.seed) == ("paper", 500, 2)
    assert point.stage1_name == "p4_m10-40_s2000_seed2"
    fresh = regime.GridPoint.parse("p8_ae_s1000_fresh3000")
    assert (fresh.tokenizer, fresh.mask, fresh.stage2_steps, fresh.seed) == ("ae", (0.0, 0.0), 3000, 0)
    assert "finetune.fresh_decoder=true" in fresh.tokenizer_overrides()
    longer_sit = regime.GridPoint.parse("p8_ae_s2000_paper10_d2000")  # a longer SiT on the same tokenizer
    assert longer_sit.sit_steps == 2000 and longer_sit.budget(regime.BASE_BUDGET).diffusion_steps == 2000
    assert longer_sit.stage1_name == "p8_ae_s2000_seed0" and fresh.budget(regime.BASE_BUDGET).diffusion_steps == 400
    with pytest.raises(SystemExit, match="does not read as"):
        regime.GridPoint.parse("p8_maetok_s100_paper10")


def test_stage_twos_of_one_stage_one_share_its_config(regime):
    """Two stage 2s (paper 25% and a fresh decoder) from one stage 1: stage 1's config is the same for both, so the
    second finds the first's stage 1 finished instead of refusing a changed config."""
    configs = []
    for name in ("p8_m40-60_s2000_paper25", "p8_m40-60_s2000_fresh4000"):
        point = regime.GridPoint.parse(name)
        configs.append(tokenizer_configs("fashion-mnist", regime.PRESET, point.budget(regime.BASE_BUDGET),
                                         point.tokenizer_overrides()))
    assert configs[0][0] == configs[1][0]
    stage2 = [c[1].finetune for c in configs]
    assert (stage2[0].steps, stage2[0].mask_decay_steps, stage2[0].mask_ratio_start) == (500, 500, 0.6)
    assert stage2[1].fresh_decoder and stage2[1].mask_ratio_start == 0 and not stage2[0].fresh_decoder
    assert load_config(TokenizerTrainConfig, regime.PRESET).finetune == configs[0][0].finetune


def test_a_tiny_grid_point_trains_and_reports(regime, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(regime, "PRESET_OVERRIDES", [*TINY, "data.eval_images=4"])
    out = tmp_path / "grid"
    args = ["--out", str(out), "--data", str(image_folder), "--image-size", "16", "--eval-images", "8", "--threads", "1",
            "--runs", "p4_ae_s2_paper50", "p4_m40-60_s2_paper50", "p4_m40-60_s2_fresh2", "--report"]
    assert regime.main(args) == 0
    results = json.loads((out / "regime.json").read_text())
    assert len(results) == 3 and all(r["figures"]["psnr"] > 0 for r in results.values())
    assert len(list((out / "stage1").iterdir())) == 2  # the masked stage 1 served both of its stage 2s
    report = (out / "regime.md").read_text()
    assert "p4_m40-60_s2_fresh2" in report and "gap after stage 2" in report
    assert (out / "regime_curves.png").stat().st_size > 1000 and (out / "regime_gap_vs_tokens.png").exists()
