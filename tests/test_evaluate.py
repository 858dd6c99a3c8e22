import json
import shutil

import pytest

from conftest import CHELSEA, COFFEE, ESPRESSO
from featcodec.cli import main
from featcodec.errors import FeatcodecError
from featcodec.evaluate import evaluate, labelled_images

EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    (root / "images").mkdir()
    shutil.copy(COFFEE, root / "images" / "a.jpg")
    shutil.copy(CHELSEA, root / "images" / "b.jpg")
    (root / "labels.csv").write_text(f"file,label,name\nimages/a.jpg,{ESPRESSO},espresso\nimages/b.jpg,{EGYPTIAN_CAT},cat\n")
    return root


def test_labels_csv_and_imagefolder_layouts(labelled_folder, tmp_path):
    assert [label for _, label in labelled_images(labelled_folder)] == [ESPRESSO, EGYPTIAN_CAT]
    (tmp_path / "n07920052").mkdir()
    shutil.copy(COFFEE, tmp_path / "n07920052" / "x.jpg")
    (tmp_path / "not-a-wnid").mkdir()
    assert labelled_images(tmp_path) == [(tmp_path / "n07920052" / "x.jpg", ESPRESSO)]
    with pytest.raises(FeatcodecError, match="no labelled images"):
        labelled_images(tmp_path / "not-a-wnid")


def test_evaluate_sweep_figures(codec, labelled_folder):
    items = labelled_images(labelled_folder)
    result = evaluate(codec, items, [0, 1])
    assert result["images"] == 2 and result["uncompressed"]["top1"] >= 0.5
    assert [p["rate"] for p in result["points"]] == [0, 1]
    for point in result["points"]:
        streams = [len(codec.encode([path], rate=point["rate"])) for path, _ in items]
        assert point["bytes_per_image"] == pytest.approx(sum(streams) / 2)
        assert point["bpp"] == pytest.approx(8 * point["bytes_per_image"] / 224**2)
        assert 0 <= point["top1"] <= point["top5"] <= 1 and 0 <= point["agreement"] <= 1


def test_eval_cli_json_and_record(labelled_folder, stage3_weights, tmp_path, capsys):
    weights = tmp_path / "ladder.safetensors"
    shutil.copy(stage3_weights, weights)
    code = main(["eval", "--data", str(labelled_folder), "--sweep", "--json", "--weights", str(weights), "--record"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result) >= {"backbone", "split", "images", "uncompressed", "points"}
    assert {"method", "setting", "bytes_per_image", "payload_bytes_per_image", "bpp", "top1", "top5", "agreement",
            "encode_ms", "decode_ms"} <= set(result["points"][0])
    from featcodec.ladder import load_ladder

    ladder = load_ladder(weights)
    assert [r["bytes_per_image"] for r in ladder.rung_info] == [round(p["bytes_per_image"], 2) for p in result["points"]]
    assert main(["eval", "--data", str(labelled_folder), "--weights", str(weights)]) == 2
    assert "exactly one of --sweep or --rate" in capsys.readouterr().err
