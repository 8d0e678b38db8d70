"""Recipes: every shipped file loads and documents its source; unknown keys and bad values are
refused with the valid choices; documentation keys are ignored; the seed recipe is exactly
today's TrainConfig defaults."""
import dataclasses
import json

import pytest

from engine.errors import ConfigError
from engine.config import TrainConfig, load_recipe
from engine.recipes import list_recipes, recipe_path
from engine.schedules import resolution_at

SHIPPED = ["fast_resnet18_16ep", "fast_resnet50_16ep", "fast_resnet50_88ep", "seed_resnet50"]


def test_shipped_recipes_are_listed():
    assert set(SHIPPED) <= set(list_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_and_names_its_source(name):
    recipe = load_recipe(name)
    assert len(recipe) >= 20                          # every recipe setting spelled out
    with open(recipe_path(name)) as f:
        raw = json.load(f)
    assert raw["_source"] and raw["_expected"]["reproduced_here"] is False
    assert 0 < raw["_expected"]["top1"] < 100
    assert not any(k.startswith("_") for k in recipe)


def test_seed_recipe_is_todays_trainconfig_defaults():
    recipe = load_recipe("seed_resnet50")
    defaults = TrainConfig(data="x")
    shared = [f.name for f in dataclasses.fields(TrainConfig) if f.name in recipe and f.name != "arch"]
    assert len(shared) >= 9
    for key in shared:
        assert recipe[key] == getattr(defaults, key), key
    assert recipe["arch"] == "resnet50"
    # the new settings are all at their "off" values
    assert recipe["optimizer"] == "sgd" and recipe["no_wd_norm_bias"] is False
    assert recipe["ema_decay"] is None and recipe["mixup_alpha"] == recipe["cutmix_alpha"] == 0
    assert recipe["min_res"] is None and recipe["val_image_size"] is None  # = image_size, 224


def test_fast_recipes_restate_ffcv_per_gpu():
    r50 = load_recipe("fast_resnet50_16ep")
    assert r50["batch_size"] * 8 == 4096 and r50["learning_rate"] * 8 == pytest.approx(1.7)
    sizes = [resolution_at(e, r50["min_res"], r50["max_res"], r50["start_ramp"], r50["end_ramp"])
             for e in range(r50["epochs"])]
    assert sizes == [160] * 12 + [192] * 4            # FFCV: 160 through epoch 11, ramp, 192
    r88 = load_recipe("fast_resnet50_88ep")
    assert (r88["epochs"], r88["start_ramp"], r88["end_ramp"]) == (88, 65, 76)
    r18 = load_recipe("fast_resnet18_16ep")
    assert (r18["batch_size"], r18["learning_rate"], r18["weight_decay"]) == (1024, 0.5, 5e-5)


def write(tmp_path, data, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_unknown_key_is_refused_with_the_valid_list(tmp_path):
    path = write(tmp_path, {"epochs": 10, "learnig_rate": 0.1})
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "learnig_rate" in message and "learning_rate" in message and "\n" not in message


def test_any_trainconfig_option_may_be_set(tmp_path):
    path = write(tmp_path, {"epochs": 10, "data": "/somewhere"})
    assert load_recipe(path) == {"epochs": 10, "data": "/somewhere"}


def test_documentation_keys_are_ignored(tmp_path):
    path = write(tmp_path, {"_source": {"url": "x"}, "_expected": {"top1": 1}, "_anything": [1],
                            "epochs": 3, "lr_schedule": "cosine"})
    assert load_recipe(path) == {"epochs": 3, "lr_schedule": "cosine"}


def test_bad_values_and_files(tmp_path):
    cases = [
        ({"lr_schedule": "onecycle"}, "step|cosine|linear|poly"),
        ({"optimizer": "adam"}, "sgd|lars"),
        ({"epochs": "16"}, "epochs must be int"),
        ({"amp": 1}, "amp must be bool"),
        ({"batch_size": True}, "batch_size must be int"),
        ({"ema_decay": "0.9"}, "ema_decay must be float/null"),
    ]
    for data, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_recipe(write(tmp_path, data))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_recipe(write(tmp_path, '{"epochs": 3,}'))
    with pytest.raises(ConfigError, match="JSON object"):
        load_recipe(write(tmp_path, [1, 2]))
    with pytest.raises(ConfigError, match="seed_resnet50"):
        load_recipe("no_such_recipe")                       # lists what is shipped
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(str(tmp_path / "missing.json"))


def test_a_half_progressive_recipe_is_refused_when_the_config_is_finalized():
    from engine.errors import UserError

    with pytest.raises(UserError, match="progressive resizing needs all of"):
        TrainConfig(data="x", min_res=160, max_res=192).finalized()
    cfg = TrainConfig(data="x", min_res=160, max_res=192, start_ramp=11, end_ramp=13)
    assert [cfg.finalized().train_size_at(e) for e in (0, 11, 12, 13)] == [160, 160, 192, 192]
    assert cfg.eval_size == 192 and TrainConfig(data="x").eval_size == 224
