"""`featcodec train --recipe FILE`: one file names the settings, the BU and the data (with hold-outs)."""

import pytest

from conftest import make_image_folder
from featcodec.cli import main
from featcodec.holdout import split_held_out
from featcodec.ladder import load_ladder
from featcodec.recipe import RecipeError, load_recipe
from featcodec.train import list_images

RECIPE = """
backbone = "efficientnet_lite0"
split = "stage5"

[train]
lambdas = [0.1, 10.0]
variable_rate = true
distortion = "mse"
steps = 6
batch_size = 4
views = 1

[bu]
latent_channels = 8
hidden_channels = 16
end_kernel = 1
hyper_channels = 4

[[data]]
path = "photos"
hold_out = 3

[[data]]
path = "more"
repeat = 2
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "photos", 8)
    make_image_folder(root / "more", 2)
    return root


def test_recipe_lists_its_data_with_hold_outs_and_repeats(data_root, tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    recipe = load_recipe(path, data_root)
    held, kept = split_held_out(list_images(data_root / "photos"), data_root / "photos", 3)
    assert set(recipe.files) == set(kept) | set(list_images(data_root / "more"))
    assert not set(held) & set(recipe.files) and len(recipe.files) == 5 + 2 * 2
    assert recipe.describe_data() == "5 of photos (3 held out) + 2 of more x2"


def test_train_recipe_end_to_end(data_root, tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    out = tmp_path / "stage5.safetensors"
    assert main(["train", "--recipe", str(path), "--data-root", str(data_root), "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "variable-rate BU (rates 0..1)" in capsys.readouterr().err
    ladder = load_ladder(out)
    assert ladder.is_variable and ladder.config.latent_channels == 8
    assert ladder.config.end_kernel == 1 and ladder.config.hyper_channels == 4
    training = ladder.extra["training"]
    assert training["recipe"] == "tiny.toml" and training["data"] == "5 of photos (3 held out) + 2 of more x2"


def test_cache_progress_reaches_a_log_file(data_root, tmp_path, capsys):
    """Into a log file (not a terminal), the cache's progress comes as a plain line per tenth of its
    views, though they come 32 at a time: 7 images x 5 views = 35, so 32 is no multiple of a tenth."""
    path = tmp_path / "views.toml"
    path.write_text(RECIPE.replace("views = 1", "views = 5").replace("hold_out = 3", "hold_out = 1")
                    .replace('[[data]]\npath = "more"\nrepeat = 2\n', ""))
    assert main(["train", "--recipe", str(path), "--data-root", str(data_root), "--out", str(tmp_path / "v.safetensors"),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    lines = [line.split(" views")[0] for line in capsys.readouterr().err.splitlines() if "feature cache: " in line]
    assert lines == ["feature cache: 0/35", "feature cache: 32/35", "feature cache: 35/35"]


@pytest.mark.parametrize("text, message", [
    (RECIPE.replace("steps = 6", "stepz = 6"), "unknown key(s) in [train]: stepz"),
    (RECIPE.replace('split = "stage5"', ""), "'split' must be given"),
    (RECIPE.replace("hold_out = 3", "hold_out = -1"), "hold_out >= 0"),
    ("backbone = ", "not a valid TOML recipe"),
])
def test_bad_recipes_are_refused_in_one_line(text, message, data_root, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, data_root)
    assert message in str(error.value)


def test_recipe_refuses_other_training_options(data_root, tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    out = tmp_path / "never.safetensors"
    assert main(["train", "--recipe", str(path), "--data-root", str(data_root), "--steps", "3", "--out", str(out)]) == 2
    assert not out.exists()
    assert "--steps: the recipe sets these" in capsys.readouterr().err
    assert main(["train", "--lambdas", "1,2"]) == 2
    assert "give --data and --lambdas, or --recipe FILE" in capsys.readouterr().err
    path.write_text(RECIPE.replace("end_kernel = 1", "end_kernel = 2"))
    assert main(["train", "--recipe", str(path), "--data-root", str(data_root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[bu] end_kernel must be 1 or 3, got 2" in err and not out.exists()


@pytest.mark.parametrize("split", ["stage2", "stage3", "stage5"])
def test_each_shipped_ladder_records_its_recipes_settings(split):
    """recipes/SPLIT.toml is what made weights/efficientnet_lite0/SPLIT.safetensors: the same BU,
    lambdas, steps and distortion, trained on its folders with the tune set held out."""
    from pathlib import Path

    from featcodec.recipe import _read_toml

    root = Path(__file__).resolve().parent.parent
    raw = _read_toml(root / "recipes" / f"{split}.toml")
    ladder = load_ladder(root / "weights" / "efficientnet_lite0" / f"{split}.safetensors")
    assert (raw["backbone"], raw["split"]) == (ladder.backbone, ladder.split) and ladder.is_variable
    info = ladder.rung_info[0]
    assert info["lambdas"] == raw["train"]["lambdas"] and info["steps"] == raw["train"]["steps"]
    for key in ("distortion", "kd_weight", "penultimate_weight"):
        assert info[key] == raw["train"][key], key
    for key, value in raw["bu"].items():
        assert getattr(ladder.config, key) == value, key
    assert ladder.config.rates == len(raw["train"]["lambdas"])
    described = ladder.extra["training"]["data"]
    for folder in raw["data"]:
        assert f"of {folder['path']} ({folder['hold_out']} held out)" in described
