"""Stand-ins for the authors' released checkpoints, at tiny size with random values, written exactly as their savers
write them (``config.json`` + ``model.safetensors`` under their key names), and a fake Hugging Face hub cache to
put them in. Shared by the tests of the released tokenizer, the released SiT and the README's commands."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

COMPAT = Path(__file__).resolve().parents[2] / "shared" / "compat" / "maetok-b-128.json"
if not COMPAT.exists():  # worktrees sit beside shared/; the main checkout too
    COMPAT = Path("/work/shared/compat/maetok-b-128.json")

# a tiny model in their format: 16px images, patch 4 (4 x 4 grid), encoder 32 wide / 2 heads / 2 blocks,
# decoder 24 wide / 2 heads / 3 blocks, 4 latent tokens x 6 channels
TINY = dict(image=16, patch=4, enc_width=32, enc_heads=2, enc_depth=2, dec_width=24, dec_heads=2, dec_depth=3,
            latents=4, latent_dim=6)


def authors_config(**changes) -> dict:
    """config.json as their saver writes it (flat ModelArgs), for the tiny model; sizes via *_model_kwargs."""
    config = json.loads(json.loads(COMPAT.read_text())["config_json_text"]) if COMPAT.exists() else {}
    config.update(
        image_size=TINY["image"], base_image_size=TINY["image"], enc_patch_size=TINY["patch"],
        dec_patch_size=TINY["patch"], num_latent_tokens=TINY["latents"], codebook_embed_dim=TINY["latent_dim"],
        encoder_model="vit_base_patch14_dinov2.lvd142m", decoder_model="vit_base_patch14_dinov2_movqv2",
        encoder_model_kwargs={"embed_dim": TINY["enc_width"], "depth": TINY["enc_depth"], "num_heads": TINY["enc_heads"]},
        decoder_model_kwargs={"embed_dim": TINY["dec_width"], "depth": TINY["dec_depth"], "num_heads": TINY["dec_heads"]},
        enc_type="vit", dec_type="vit", use_ape=False, use_rope=True, rope_mixed=True, rope_theta=10.0,
        vq_mean=0.25, vq_std=1.5, to_pixel="linear",
    )
    config.update(changes)
    return config


def authors_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under their key names and shapes (unused keys included), for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    t = TINY
    n = (t["image"] // t["patch"]) ** 2
    ew, dw, ld, L, p = t["enc_width"], t["dec_width"], t["latent_dim"], t["latents"], t["patch"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    grid = t["image"] // p
    idx = torch.arange(n, dtype=torch.float32)
    s = {
        "encoder.latent_tokens": r(1, L, ew), "encoder.latent_pos_embed": r(1, L, ew), "encoder.mask_token": r(1, 1, ew),
        "encoder.freqs": r(2, t["enc_depth"], ew // 2, scale=1.0),
        "encoder.freqs_t_x": idx % grid, "encoder.freqs_t_y": torch.div(idx, grid, rounding_mode="floor"),
        "encoder.model.cls_token": r(1, 1, ew), "encoder.model.pos_embed": r(1, n + 1, ew),
        "encoder.model.patch_embed.proj.weight": r(ew, 3, p, p), "encoder.model.patch_embed.proj.bias": r(ew),
        "encoder.model.norm.weight": 1 + r(ew), "encoder.model.norm.bias": r(ew),
        "quant_conv.weight": r(ld, ew), "quant_conv.bias": r(ld),
        "post_quant_conv.weight": r(dw, ld), "post_quant_conv.bias": r(dw),
        "decoder.mask_token": r(1, 1, dw), "decoder.latent_pos_embed": r(1, L, dw),
        "decoder.freqs": r(2, t["dec_depth"], dw // 2, scale=1.0),
        "decoder.freqs_t_x": idx % grid, "decoder.freqs_t_y": torch.div(idx, grid, rounding_mode="floor"),
        "decoder.model.pos_embed": r(1, n + 1, dw),
        "decoder.model.patch_embed.proj.weight": r(dw, 3, p, p), "decoder.model.patch_embed.proj.bias": r(dw),
        "decoder.model.norm.adaLN_modulation.1.weight": r(2 * dw, ld), "decoder.model.norm.adaLN_modulation.1.bias": r(2 * dw),
        "decoder.to_pixel.model.weight": r(p * p * 3, dw), "decoder.to_pixel.model.bias": r(p * p * 3),
    }
    for i in range(t["enc_depth"]):
        b = f"encoder.model.blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(ew), b + "norm1.bias": r(ew), b + "attn.qkv.weight": r(3 * ew, ew),
                  b + "attn.qkv.bias": r(3 * ew), b + "attn.proj.weight": r(ew, ew), b + "attn.proj.bias": r(ew),
                  b + "ls1.gamma": r(ew, scale=0.5), b + "norm2.weight": 1 + r(ew), b + "norm2.bias": r(ew),
                  b + "mlp.fc1.weight": r(4 * ew, ew), b + "mlp.fc1.bias": r(4 * ew), b + "mlp.fc2.weight": r(ew, 4 * ew),
                  b + "mlp.fc2.bias": r(ew), b + "ls2.gamma": r(ew, scale=0.5)})
    for i in range(t["dec_depth"]):
        b = f"decoder.model.blocks.{i}."
        s.update({b + "attn.qkv.weight": r(3 * dw, dw), b + "attn.qkv.bias": r(3 * dw), b + "attn.proj.weight": r(dw, dw),
                  b + "attn.proj.bias": r(dw), b + "mlp.fc1.weight": r(4 * dw, dw), b + "mlp.fc1.bias": r(4 * dw),
                  b + "mlp.fc2.weight": r(dw, 4 * dw), b + "mlp.fc2.bias": r(dw),
                  b + "adaLN_modulation.1.weight": r(4 * dw, ld), b + "adaLN_modulation.1.bias": r(4 * dw)})
    return s


def write_authors_folder(folder: Path, state: dict | None = None, config: dict | None = None, seed: int = 0) -> Path:
    """A tokenizer folder as their saver writes it: config.json (sorted keys, indent 2) + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else authors_state(seed), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config if config is not None else authors_config(), indent=2,
                                                   sort_keys=True))
    return folder


COMPAT_SIT = Path(__file__).resolve().parents[2] / "shared" / "compat" / "sit-xl-maetok.json"
if not COMPAT_SIT.exists():
    COMPAT_SIT = Path("/work/shared/compat/sit-xl-maetok.json")

# the authors' SiT config.json at tiny size: 4 tokens of 4 channels, width 32, 2 blocks of 2 heads, 3 classes
TINY_AUTHORS_CONFIG = {
    "class_dropout_prob": 0.1, "decoder_hidden_size": 32, "depth": 2, "flash_attn": True, "fused_attn": False,
    "hidden_size": 32, "in_channels": 4, "input_size": 4, "license": "apache-2.0", "mlp_ratio": 4.0,
    "num_classes": 3, "num_heads": 2, "patch_size": 1, "path_type": "edm", "qk_norm": False,
    "repo_url": "https://github.com/Hhhhhhao/continuous_tokenizer", "tags": ["SiT"], "use_cfg": True,
    "vae_1d": True, "z_dims": [0],
}


def authors_shapes(config: dict) -> dict[str, list[int]]:
    """Every key and shape of the authors' SiT on 1D latents, from its config (their module layout)."""
    d, c, n = config["hidden_size"], config["in_channels"], config["input_size"]
    hidden = int(d * config["mlp_ratio"])
    shapes = {
        "pos_embed": [1, n, d], "x_embedder.weight": [d, c], "x_embedder.bias": [d],
        "t_embedder.mlp.0.weight": [d, 256], "t_embedder.mlp.0.bias": [d],
        "t_embedder.mlp.2.weight": [d, d], "t_embedder.mlp.2.bias": [d],
        "y_embedder.embedding_table.weight": [config["num_classes"] + int(config["use_cfg"]), d],
    }
    for i in range(config["depth"]):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": [3 * d, d], f"blocks.{i}.attn.qkv.bias": [3 * d],
            f"blocks.{i}.attn.proj.weight": [d, d], f"blocks.{i}.attn.proj.bias": [d],
            f"blocks.{i}.mlp.fc1.weight": [hidden, d], f"blocks.{i}.mlp.fc1.bias": [hidden],
            f"blocks.{i}.mlp.fc2.weight": [d, hidden], f"blocks.{i}.mlp.fc2.bias": [d],
            f"blocks.{i}.adaLN_modulation.1.weight": [6 * d, d], f"blocks.{i}.adaLN_modulation.1.bias": [6 * d],
        })
    shapes.update({
        "final_layer.linear.weight": [c, d], "final_layer.linear.bias": [c],
        "final_layer.adaLN_modulation.1.weight": [2 * d, d], "final_layer.adaLN_modulation.1.bias": [2 * d],
    })
    return shapes


def authors_pos_embed(length: int, dim: int) -> torch.Tensor:
    """Their fixed 1D position code: sin on even channels, cos on odd ones, frequency 10000^(-2i/dim)."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table[None].float()


def write_authors_sit(folder: Path, config: dict = TINY_AUTHORS_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folder as their save_pretrained writes it (config.json + model.safetensors), random values."""
    generator = torch.Generator().manual_seed(seed)
    state = {name: 0.3 * torch.randn(shape, generator=generator) for name, shape in authors_shapes(config).items()}
    state["pos_embed"] = authors_pos_embed(config["input_size"], config["hidden_size"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(state, str(folder / "model.safetensors"))
    return state


def put_in_hub_cache(hub: Path, repo_id: str, folder: Path, commit: str = "c" * 40) -> Path:
    """Copy ``folder`` into a Hugging Face hub cache at ``hub`` as the ``refs/main`` snapshot of ``repo_id``."""
    import shutil

    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
