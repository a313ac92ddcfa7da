"""The config machinery (maetok.config on OmegaConf structured configs): layers merged in order, YAML presets with
``base:``, ``key.sub=value`` overrides, tuples, ``options`` replaced whole, one-line errors that name the dotted key
and the value, and each class's validation in its ``validate()``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import pytest

from maetok.config import (
    Budget,
    ConfigError,
    DataConfig,
    DiffusionTrainConfig,
    LossConfig,
    TokenizerTrainConfig,
    TransportConfig,
    from_dict,
    load_config,
    parse_overrides,
    read_preset,
    to_dict,
)


@dataclass
class Inner:
    count: int = 1
    options: dict = field(default_factory=dict)


@dataclass
class Schema:
    """Every kind of field a config class may hold."""

    family: ClassVar[str] = "test"

    number: int = 3
    ratio: float = 0.5
    flag: bool = False
    name: str = "x"
    limit: Optional[int] = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[float, float] = (0.1, 0.2)
    ks: tuple[int, ...] = (1,)
    table: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=lambda: Inner(count=7))
    items: list[Inner] = field(default_factory=list)


def write(path, text: str):
    path.write_text(text)
    return path


def test_any_dataclass_is_built_from_a_partial_mapping():
    cfg = from_dict(Schema, {"ratio": "3e-4", "limit": 4, "pair": [0.3, 0.4], "ks": [1, 2, 3], "table": {"a": 1},
                             "inner": {"options": {"b": 2}}, "items": [{"count": 2}], "flag": True})
    assert cfg == Schema(ratio=3e-4, flag=True, limit=4, pair=(0.3, 0.4), ks=(1, 2, 3), table={"a": 1},
                         inner=Inner(count=7, options={"b": 2}), items=[Inner(count=2)])
    assert isinstance(cfg.pair, tuple) and isinstance(cfg.ks, tuple) and isinstance(cfg.ratio, float)
    assert cfg.inner.count == 7  # a nested partial mapping starts from the field's default
    assert from_dict(Schema, to_dict(cfg)) == cfg and Schema.family == "test"


@pytest.mark.parametrize("data, message", [
    ({"numbr": 1}, "unknown config key 'f.json.numbr'; known keys here: ['flag', 'inner', 'items', 'ks', 'limit'"),
    ({"inner": {"cnt": 1}}, "unknown config key 'f.json.inner.cnt'; known keys here: ['count', 'options']"),
    ({"items": [{}, {"cnt": 1}]}, "unknown config key 'f.json.items[1].cnt'"),
    ({"number": "many"}, "f.json.number: expected an integer, got 'many'"),
    ({"number": 2.5}, "f.json.number: expected an integer, got 2.5"),
    ({"ratio": "half"}, "f.json.ratio: expected a number, got 'half'"),
    ({"flag": "maybe"}, "f.json.flag: expected true/false, got 'maybe'"),
    ({"name": None}, "f.json.name: expected a string, got None"),
    ({"limit": "x"}, "f.json.limit: expected Optional[int], got 'x'"),
    ({"sizes": [1, "x"]}, "f.json.sizes: expected list[int], got [1, 'x']"),
    ({"pair": [0.1, "x"]}, "f.json.pair: expected tuple[float, float], got [0.1, 'x']"),
    ({"table": 5}, "f.json.table: expected dict, got 5"),
    ({"inner": 5}, "f.json.inner: expected Inner, got 5"),
    ({"items": {"0": {"count": 1}}}, "f.json.items: expected list[Inner], got {'0': {'count': 1}}"),
    ({"items": [5]}, "f.json.items[0]: expected a mapping of Inner keys, got 5"),
    ({"items": [{"count": "x"}]}, "f.json.items[0].count: expected an integer, got 'x'"),
    (None, "f.json: expected a mapping of Schema keys, got None"),
    ({"name": "${nowhere}"}, "f.json.name: Interpolation key 'nowhere' not found"),
])
def test_errors_name_the_dotted_key_and_the_value_in_one_line(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Schema, data, where="f.json")
    assert str(err.value).startswith(message) and "\n" not in str(err.value) and "full_key" not in str(err.value)


def test_presets_inherit_through_base_and_overrides_come_last(tmp_path):
    write(tmp_path / "base.yaml", "base: fashion-mnist-ae\noptim: {lr: 3e-4}\nmodel:\n  aux_targets: "
                                  "[{name: hog, options: {a: 1, b: 2}}]\n  mask_ratio_max: 0.5\n  variant: maetok\n")
    child = write(tmp_path / "child.yaml", f"base: {tmp_path / 'base.yaml'}\nmodel:\n  aux_targets: "
                                            "[{name: hog, options: {b: 3}}]\n")
    raw = read_preset(str(child))
    assert raw["model"]["mask_ratio_max"] == 0.5 and raw["model"]["image_size"] == 32 and "base" not in raw
    cfg = load_config(TokenizerTrainConfig, str(child), ["train.steps=9", "model.mask_ratio_min=0.1"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model.aux_targets[0].options == {"b": 3}  # an options mapping is replaced whole, never merged
    assert (cfg.train.steps, cfg.model.mask_ratio_min, cfg.model.image_size) == (9, 0.1, 32)
    over = load_config(TokenizerTrainConfig, str(child), ["model.aux_targets=[{name: hog, options: {c: 4}}]"])
    assert over.model.aux_targets[0].options == {"c": 4}
    # a mapping (a run's config) as the preset: what finetune-decoder starts from
    again = load_config(TokenizerTrainConfig, to_dict(cfg), ["train.steps=3"])
    assert again.train.steps == 3 and to_dict(again) == {**to_dict(cfg), "train": {**to_dict(cfg.train), "steps": 3}}


def test_a_nested_section_starts_from_the_parent_default():
    cfg = from_dict(DiffusionTrainConfig, {"optim": {"lr": 5e-4}})
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.schedule == "constant" and cfg.optim.lr == 5e-4


def test_overrides_are_parsed_as_yaml():
    assert parse_overrides(["a.b=3e-4", "a.c=[1, 2]", "d=null", "e=x=y", "f={g: true}"]) == {
        "a": {"b": 3e-4, "c": [1, 2]}, "d": None, "e": "x=y", "f": {"g": True}}
    with pytest.raises(ConfigError, match=r"^override 'train.steps' is not of the form key.sub=value$"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match=r"^override 'a=\[1': cannot parse the value"):
        parse_overrides(["a=[1"])


def test_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no preset or YAML file named 'nope'; presets: .*tiny-maetok"):
        read_preset("nope")
    loop = write(tmp_path / "loop.yaml", f"base: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ConfigError, match="inherits from itself"):
        read_preset(str(loop))
    with pytest.raises(ConfigError, match="must be a mapping at the top level"):
        read_preset(str(write(tmp_path / "list.yaml", "- 1\n")))
    with pytest.raises(ConfigError, match="cannot parse"):
        read_preset(str(write(tmp_path / "bad.yaml", "a: [1\n")))


def test_each_class_validates_in_its_validate():
    DataConfig(max_image_pixels=-1)  # building checks types only; validate() checks values
    for data, key in ((DataConfig(max_image_pixels=-1), "data.max_image_pixels"),
                      (DataConfig(eval_images=0), "data.eval_images"),
                      (LossConfig(kl_weight=-1.0), "loss.kl_weight"),
                      (LossConfig(gan_lr=0.0), "loss.gan_lr"),
                      (TransportConfig(time_sampling="beta"), "transport.time_sampling"),
                      (TransportConfig(latent_norm="pixel"), "transport.latent_norm")):
        with pytest.raises(ConfigError, match=rf"^{key}"):
            data.validate()
    for section, override in (("data", "data.eval_images=0"), ("loss", "loss.gan_weight=-1")):
        with pytest.raises(ConfigError, match=rf"^{section}\."):
            load_config(TokenizerTrainConfig, "fashion-mnist-maetok", [override])
    with pytest.raises(ConfigError, match=r"^transport.latent_norm"):
        load_config(DiffusionTrainConfig, "fashion-mnist-sit", ["transport.latent_norm=pixel"])
    with pytest.raises(ConfigError, match=r"^optim.betas must be two numbers"):
        load_config(TokenizerTrainConfig, "fashion-mnist-maetok", ["optim.betas=[0.9, 1.5]"])


def test_budget_validates_its_losses():
    budget = Budget(stage1_steps=1, stage2_steps=1, diffusion_steps=1, eval_images=1, fid_samples=1,
                    fid_sampling_steps=1, probe_train=1, gmm_ks=(1,), gmm_train=1, cache_limit=None, stage2_loss="ful")
    with pytest.raises(ConfigError, match=r"^Budget.stage2_loss must be 'mse' or 'full', got 'ful'"):
        budget.validate()
    with pytest.raises(ConfigError, match="Budget.stage2_loss"):
        from maetok.pipeline import tokenizer_overrides

        tokenizer_overrides(budget)


def test_a_preset_that_does_not_fit_its_base_is_named(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  aux_targets: [{name: hog}]\n")
    child = write(tmp_path / "child.yaml", f"base: {tmp_path / 'base.yaml'}\nmodel:\n  aux_targets: {{name: hog}}\n")
    with pytest.raises(ConfigError, match=rf"^{child} does not fit its base '{tmp_path / 'base.yaml'}': cannot merge"):
        read_preset(str(child))
