"""The authors' released MAETok: every key of the real checkpoint maps onto our modules (full size, meta device),
and at tiny size, in the format their saver writes, loading is strict and our encode / decode equals an
independent plain-torch reimplementation of their block equations (shared/docs/METHOD.md §5) on the same weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from released_standins import COMPAT, TINY, authors_config, authors_state, write_authors_folder

from maetok.models.released import (
    IGNORED_KEYS,
    ReleasedMAETok,
    authors_architecture,
    authors_expected_shapes,
    is_ignored_key,
    map_authors_state,
    timm_architecture,
)
from maetok.models.tokenizer import MAETok

# ---------------------------------------------------------------------------------------------------------
# An independent reimplementation of their equations (plain torch on their key names; none of our modules)
# ---------------------------------------------------------------------------------------------------------


def ref_mixed_cis(freqs, t_x, t_y, heads):
    """Complex rotations per layer (depth, heads, N, head_dim/2): polar(1, t_x f_x + t_y f_y)."""
    depth, n = freqs.shape[1], t_x.shape[0]
    fx = (t_x.unsqueeze(-1) @ freqs[0].unsqueeze(-2)).view(depth, n, heads, -1).permute(0, 2, 1, 3)
    fy = (t_y.unsqueeze(-1) @ freqs[1].unsqueeze(-2)).view(depth, n, heads, -1).permute(0, 2, 1, 3)
    return torch.polar(torch.ones_like(fx), fx + fy)


def ref_rotate(x, cis):
    """Rotate adjacent pairs of x (B, heads, N, head_dim) as complex numbers."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis[None]).flatten(3)


def ref_attention(x, s, b, heads, cis, first, last):
    """Manual softmax attention; RoPE on tokens [first, last) only."""
    B, N, C = x.shape
    qkv = (x @ s[b + "attn.qkv.weight"].T + s[b + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    q, k = q.clone(), k.clone()
    q[:, :, first:last] = ref_rotate(q[:, :, first:last], cis)
    k[:, :, first:last] = ref_rotate(k[:, :, first:last], cis)
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return out @ s[b + "attn.proj.weight"].T + s[b + "attn.proj.bias"]


def ref_mlp(x, s, b):
    h = F.gelu(x @ s[b + "mlp.fc1.weight"].T + s[b + "mlp.fc1.bias"])
    return h @ s[b + "mlp.fc2.weight"].T + s[b + "mlp.fc2.bias"]


def ref_encode(s, images, heads, p, L, t_xy=None):
    e = "encoder.model."
    x = F.conv2d(images, s[e + "patch_embed.proj.weight"], s[e + "patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    B, N, C = x.shape
    x = torch.cat([s[e + "cls_token"].expand(B, -1, -1), x], 1) + s[e + "pos_embed"]
    x = torch.cat([x, (s["encoder.latent_tokens"] + s["encoder.latent_pos_embed"]).expand(B, -1, -1)], 1)
    cis = ref_mixed_cis(s["encoder.freqs"], *(t_xy or (s["encoder.freqs_t_x"], s["encoder.freqs_t_y"])), heads)
    depth = s["encoder.freqs"].shape[1]
    for i in range(depth):
        b = f"{e}blocks.{i}."
        h = F.layer_norm(x, (C,), s[b + "norm1.weight"], s[b + "norm1.bias"], 1e-6)
        x = x + s[b + "ls1.gamma"] * ref_attention(h, s, b, heads, cis[i], 1, 1 + N)
        h = F.layer_norm(x, (C,), s[b + "norm2.weight"], s[b + "norm2.bias"], 1e-6)
        x = x + s[b + "ls2.gamma"] * ref_mlp(h, s, b)
    x = F.layer_norm(x, (C,), s[e + "norm.weight"], s[e + "norm.bias"], 1e-6)
    return x[:, -L:] @ s["quant_conv.weight"].T + s["quant_conv.bias"]


def ref_decode(s, z, heads, p, grid, t_xy=None):
    L = z.shape[1]
    zq = z  # the raw latent drives the modulation
    h = z @ s["post_quant_conv.weight"].T + s["post_quant_conv.bias"]
    B, C = z.shape[0], h.shape[-1]
    N = grid * grid
    x = torch.cat([s["decoder.mask_token"].expand(B, N, -1), h + s["decoder.latent_pos_embed"]], 1)
    cis = ref_mixed_cis(s["decoder.freqs"], *(t_xy or (s["decoder.freqs_t_x"], s["decoder.freqs_t_y"])), heads)

    def modulated(y, shift, scale):
        return torch.cat([y[:, :-L], y[:, -L:] * scale + shift], 1)

    for i in range(s["decoder.freqs"].shape[1]):
        b = f"decoder.model.blocks.{i}."
        mod = F.silu(zq) @ s[b + "adaLN_modulation.1.weight"].T + s[b + "adaLN_modulation.1.bias"]
        sh1, sc1, sh2, sc2 = mod.chunk(4, -1)
        x = x + ref_attention(modulated(F.layer_norm(x, (C,), eps=1e-6), sh1, sc1), s, b, heads, cis[i], 0, N)
        x = x + ref_mlp(modulated(F.layer_norm(x, (C,), eps=1e-6), sh2, sc2), s, b)
    b = "decoder.model.norm."
    shift, scale = (F.silu(zq) @ s[b + "adaLN_modulation.1.weight"].T + s[b + "adaLN_modulation.1.bias"]).chunk(2, -1)
    x = modulated(F.layer_norm(x, (C,), eps=1e-6), shift, scale)[:, :N]
    patches = x @ s["decoder.to_pixel.model.weight"].T + s["decoder.to_pixel.model.bias"]
    patches = patches.reshape(B, grid, grid, p, p, 3)
    return torch.einsum("nhwpqc->nchpwq", patches).reshape(B, 3, grid * p, grid * p)


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not COMPAT.exists(), reason="shared/compat listing not present")
def test_every_released_key_and_shape_maps_onto_our_modules_at_full_size():
    listing = json.loads(COMPAT.read_text())
    shapes = {k: tuple(v) for k, v in listing["keys"].items()}
    config, arch = authors_architecture(listing["config_json_as_written_by_save_pretrained"], shapes, "config.json",
                                        "model.safetensors")
    assert (config.encoder_width, config.encoder_depth, config.encoder_heads) == (768, 12, 12)
    assert (config.decoder_width, config.decoder_depth, config.decoder_heads) == (768, 12, 12)
    assert (config.patch_size, config.num_latent_tokens, config.latent_dim, config.layer_scale_init) == (16, 128, 32, 1e-5)
    assert arch.encoder_cls_token and arch.encoder_pos_embed  # their config says use_ape: false; the weights decide
    with torch.device("meta"):
        model = ReleasedMAETok(config, arch)
    expected = authors_expected_shapes(model)
    ignored = sorted(k for k in shapes if is_ignored_key(k))
    assert sorted(IGNORED_KEYS) == sorted(listing["unused_by_encode_decode"]) == ignored
    assert expected == {k: v for k, v in shapes.items() if k not in ignored}  # nothing left over, every shape equal
    mapped, dropped = map_authors_state(shapes)
    assert sorted(dropped) == ignored and mapped == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    total = sum(v.numel() for v in model.state_dict().values()) + sum(math.prod(shapes[k]) for k in ignored)
    assert total == listing["num_elements"]


def test_timm_table_names():
    assert timm_architecture("vit_base_patch14_dinov2.lvd142m") == (768, 12, 12)
    assert timm_architecture("vit_base_patch14_dinov2_movqv2") == (768, 12, 12)
    assert timm_architecture("vit_small_patch14_dinov2_movq") == (384, 12, 6)
    assert timm_architecture("unknown") is None


def test_tiny_released_checkpoint_matches_an_independent_reimplementation(tmp_path):
    state = authors_state(seed=1)
    folder = write_authors_folder(tmp_path / "released", state)
    model = MAETok.from_pretrained(folder)
    assert isinstance(model, ReleasedMAETok)
    assert (model.latent_mean, model.latent_std) == (0.25, 1.5)
    cfg = model.config
    assert (cfg.encoder_width, cfg.encoder_heads, cfg.decoder_width, cfg.decoder_depth) == (32, 2, 24, 3)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images)
        expected_latents = ref_encode(state, images, TINY["enc_heads"], TINY["patch"], TINY["latents"])
        assert latents.shape == (3, 4, 6)
        torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-5)
        decoded = model.decode(latents)
        expected_images = ref_decode(state, latents, TINY["dec_heads"], TINY["patch"], 4)
        assert decoded.shape == images.shape
        torch.testing.assert_close(decoded, expected_images, rtol=1e-4, atol=1e-5)
    # the references are not trivially equal to something that ignores RoPE / modulation / LayerScale
    assert (latents - ref_encode({**state, "encoder.freqs": torch.zeros_like(state["encoder.freqs"])}, images, 2, 4, 4)
            ).abs().max() > 1e-3


def test_a_base_grid_smaller_than_the_image_uses_the_image_grid(tmp_path):
    """Their 512px variant stores RoPE positions of the 256px grid (base_image_size); a larger grid gets its own
    positions (their init_t_xy(W / p, H / p)). Here: stored 2 x 2 positions, 4 x 4 images."""
    state = authors_state(seed=4)
    small = torch.arange(4, dtype=torch.float32)
    for part in ("encoder", "decoder"):
        state[f"{part}.freqs_t_x"], state[f"{part}.freqs_t_y"] = small % 2, torch.div(small, 2, rounding_mode="floor")
    model = MAETok.from_pretrained(write_authors_folder(tmp_path / "r", state, authors_config(base_image_size=8)))
    assert model.architecture.rope_grid == 2
    idx = torch.arange(16, dtype=torch.float32)
    own = (idx % 4, torch.div(idx, 4, rounding_mode="floor"))
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images)
        torch.testing.assert_close(latents, ref_encode(state, images, 2, 4, 4, own), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decode(latents), ref_decode(state, latents, 2, 4, 4, own), rtol=1e-4, atol=1e-5)


def test_loading_is_strict_and_lists_the_differences(tmp_path, caplog):
    state = authors_state()
    # one key missing, one unexpected, one mis-shaped
    state.pop("encoder.model.blocks.1.ls2.gamma")
    state["decoder.extra_head.weight"] = torch.zeros(3)
    state["decoder.mask_token"] = torch.zeros(1, 2, TINY["dec_width"])
    folder = write_authors_folder(tmp_path / "bad", state)
    with pytest.raises(ValueError) as err:
        MAETok.from_pretrained(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / "model.safetensors") in message
    assert "1 missing (encoder.model.blocks.1.ls2.gamma)" in message
    assert "1 unexpected (decoder.extra_head.weight)" in message
    assert "1 mis-shaped (decoder.mask_token (file [1, 2, 24], model [1, 1, 24]))" in message
    assert "missing: encoder.model.blocks.1.ls2.gamma" in caplog.text  # the full list, in the log


def test_architecture_follows_the_weights_not_the_flags(tmp_path):
    """use_ape false in the config, pos_embed in the weights: the position embedding is used. Without it in the
    weights, the model is built without one (and loads strictly)."""
    state = authors_state()
    with_ape = MAETok.from_pretrained(write_authors_folder(tmp_path / "a", state))
    assert with_ape.encoder.pos_embed is not None
    no_ape = {k: v for k, v in state.items() if k != "encoder.model.pos_embed"}
    without = MAETok.from_pretrained(write_authors_folder(tmp_path / "b", no_ape, authors_config(use_ape=True)))
    assert without.encoder.pos_embed is None
    images = torch.zeros(1, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(with_ape.encode(images), without.encode(images))


def test_heads_come_from_the_table_or_the_kwargs(tmp_path):
    config = authors_config()
    del config["encoder_model_kwargs"]  # vit_base's table width 768 disagrees with the weights' 32
    with pytest.raises(ValueError, match="encoder_model 'vit_base_patch14_dinov2.lvd142m' has width 768 but the "
                                         "weights have 32; set encoder_model_kwargs.num_heads"):
        MAETok.from_pretrained(write_authors_folder(tmp_path / "a", config=config))
    config = authors_config(encoder_model_kwargs={"embed_dim": 64, "num_heads": 2})
    with pytest.raises(ValueError, match="encoder_model_kwargs.embed_dim=64 but the weights have 32"):
        MAETok.from_pretrained(write_authors_folder(tmp_path / "b", config=config))
    config = authors_config(encoder_model_kwargs={"num_heads": 4})
    assert MAETok.from_pretrained(write_authors_folder(tmp_path / "c", config=config)).config.encoder_heads == 4


def test_a_non_released_layout_fails_in_one_line(tmp_path):
    state = {k: v for k, v in authors_state().items() if not k.startswith("decoder.freqs")}
    with pytest.raises(ValueError, match="has no decoder.freqs .the decoder's RoPE-mixed frequencies.: not the "
                                         "released MAETok architecture"):
        MAETok.from_pretrained(write_authors_folder(tmp_path / "a", state))


def test_a_nonfinite_released_folder_is_refused(tmp_path):
    state = authors_state()
    state["post_quant_conv.bias"][0] = float("nan")
    folder = write_authors_folder(tmp_path / "nan", state=state)
    with pytest.raises(ValueError, match="non-finite values"):
        MAETok.from_pretrained(folder)
    broken = write_authors_folder(tmp_path / "bad", config=authors_config(vq_mean=None))
    with pytest.raises(ValueError, match=r"config\.json: cannot read the architecture"):
        MAETok.from_pretrained(broken)
