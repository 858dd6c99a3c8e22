import json
import shutil

import pytest

from conftest import CHELSEA, COFFEE, ESPRESSO
from featcodec import bitstream
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


def test_evaluate_max_bytes_picks_each_rung_as_the_encoder_does(codec, labelled_folder):
    items = labelled_images(labelled_folder)
    paths = [path for path, _ in items]
    record_sizes = sorted({bitstream.parse_stream(codec.encode([path], rate=r))[0].size
                          for path in paths for r in range(codec.num_rates)})
    budgets = [record_sizes[len(record_sizes) // 2], record_sizes[-1]]
    rates = list(range(codec.num_rates))
    result = evaluate(codec, items, rates, max_bytes=budgets)
    capped = [p for p in result["points"] if p["method"] == "featcodec-max-bytes"]
    assert [p["setting"] for p in capped] == [f"max {b} B" for b in budgets] and all(p["rate"] is None for p in capped)
    for budget, point, choice in zip(budgets, capped, result["max_bytes"]):
        encoded = [codec.encode_within([path], budget) for path in paths]  # the encoder's own choice
        chosen = [rung for _, (rung,) in encoded]
        assert choice["rungs"] == [chosen.count(rate) for rate in rates] and choice["max_bytes"] == budget
        streams = [len(data) for data, _ in encoded]
        assert point["bytes_per_image"] == pytest.approx(sum(streams) / len(streams))
        assert choice["largest_stream"] == max(streams) <= budget + len(bitstream.PREAMBLE)
        by_rate = {p["rate"]: p for p in result["points"] if p["method"] == "featcodec"}
        if len(set(chosen)) == 1:  # one rung for every image: that rung's figures
            assert point["top1"] == by_rate[chosen[0]]["top1"] and point["mse"] == pytest.approx(by_rate[chosen[0]]["mse"])
    assert capped[-1]["bytes_per_image"] == result["points"][-len(budgets) - 1]["bytes_per_image"]  # all at the top
    with pytest.raises(FeatcodecError, match="need more even at rate 0 of efficientnet_lite0/stage3"):
        evaluate(codec, items, rates, max_bytes=[record_sizes[0] - 1])
    with pytest.raises(FeatcodecError, match="evaluate every rate"):
        evaluate(codec, items, [0], max_bytes=budgets)


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
    assert [r["bytes_per_image"] for r in ladder.rung_info] == [round(p["bytes_per_image"], 4) for p in result["points"]]
    assert main(["eval", "--data", str(labelled_folder), "--weights", str(weights)]) == 2
    assert "exactly one of --sweep or --rate" in capsys.readouterr().err


def test_eval_cli_baselines_csv_plot(labelled_folder, stage3_weights, tmp_path, capsys):
    weights = tmp_path / "ladder.safetensors"
    shutil.copy(stage3_weights, weights)
    csv_file, plot_file = tmp_path / "out" / "points.csv", tmp_path / "out" / "curve.png"
    code = main([
        "eval", "--data", str(labelled_folder), "--sweep", "--json", "--weights", str(weights), "--record",
        "--baselines", "jpeg,quant8", "--csv", str(csv_file), "--plot", str(plot_file),
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)  # stdout holds the JSON only; the table is on stderr
    assert "top-1" in captured.err and "BD-rate of featcodec against jpeg" in captured.err
    fields = {"method", "setting", "rate", "bytes_per_image", "payload_bytes_per_image", "bpp", "top1", "top5",
              "agreement", "mse", "encode_ms", "decode_ms"}
    for point in result["points"]:
        assert set(point) == fields
        assert 0 <= point["top1"] <= point["top5"] <= 1 and 0 <= point["agreement"] <= 1
        assert point["bytes_per_image"] > 0 and point["bpp"] == pytest.approx(8 * point["bytes_per_image"] / 224**2)
        assert point["mse"] >= 0 and point["encode_ms"] >= 0 and point["decode_ms"] >= 0
        assert (point["rate"] is None) == (point["method"] != "featcodec")
    methods = [p["method"] for p in result["points"]]
    assert methods.count("featcodec") == 2 and methods.count("jpeg") == 7
    assert methods.count("quant8-zlib") == methods.count("fp16-zlib") == 1
    assert set(result["bd_rate"]) == {"jpeg", "quant8-zlib", "fp16-zlib"}
    assert all(v is None or isinstance(v, float) for v in result["bd_rate"].values())
    assert result["bd_rate"]["quant8-zlib"] is None  # a single point is no curve

    import csv

    with csv_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["setting"]) for r in rows] == [(p["method"], p["setting"]) for p in result["points"]]
    assert [float(r["bytes_per_image"]) for r in rows] == [p["bytes_per_image"] for p in result["points"]]
    assert plot_file.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(csv_file.parent.glob(".*.tmp"))

    from featcodec.ladder import load_ladder

    featcodec_points = [p for p in result["points"] if p["method"] == "featcodec"]
    assert [r["bytes_per_image"] for r in load_ladder(weights).rung_info] == [
        round(p["bytes_per_image"], 4) for p in featcodec_points
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baselines", "webp"], "unknown baseline 'webp'"),
        (["--baselines", "none,jpeg"], "cannot be combined"),
        (["--plot", "curve.svg"], "give a .png file name"),
        (["--max-bytes", "200,x"], "--max-bytes takes positive byte counts"),
        (["--max-bytes", "0"], "--max-bytes takes positive byte counts"),
        (["--max-bytes", "200"], "--max-bytes picks a rung per image: leave out --rate"),
    ],
)
def test_eval_cli_bad_options(labelled_folder, stage3_weights, args, message, capsys):
    code = main(["eval", "--data", str(labelled_folder), "--rate", "0", "--weights", str(stage3_weights), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_eval_all_splits(labelled_folder, weights_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(weights_dir))
    csv_file, plot_file = tmp_path / "points.csv", tmp_path / "curve.png"
    args = ["eval", "--data", str(labelled_folder), "--all-splits", "--limit", "1", "--json"]
    assert main(args + ["--csv", str(csv_file), "--plot", str(plot_file)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["split"] for r in results] == ["stage2", "stage3", "stage5"]
    assert all(len(r["points"]) == 2 and r["images"] == 1 for r in results)
    import csv

    with csv_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["split"] for row in rows] == ["stage2", "stage2", "stage3", "stage3", "stage5", "stage5"]
    assert sorted(p.name for p in tmp_path.glob("curve-*.png")) == ["curve-stage2.png", "curve-stage3.png", "curve-stage5.png"]
    assert main(args + ["--split", "stage3"]) == 2
    assert "--all-splits" in capsys.readouterr().err


def test_record_keeps_enough_digits_to_round_like_the_csv(tmp_path):
    """`--record` stores bytes with 4 decimals: 2137.046 must show as 2137.0, as the CSV rounds it, not 2137.1."""
    from conftest import make_tiny_ladder
    from featcodec.cli import _record_measurements
    from featcodec.ladder import load_ladder

    path = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "tiny.safetensors")
    points = [
        {"method": "featcodec", "rate": 0, "bytes_per_image": 2137.046153846, "top1": 0.797692307},
        {"method": "featcodec", "rate": 1, "bytes_per_image": 63.365384615, "top1": 0.206923082},
        {"method": "jpeg", "rate": None, "bytes_per_image": 1.0, "top1": 0.5},
    ]
    result = {"points": points, "images": 1300, "uncompressed": {"top1": 0.824615}}
    _record_measurements(load_ladder(path), "featcodec", result, tmp_path / "val")
    info = load_ladder(path).rung_info
    assert [r["bytes_per_image"] for r in info] == [2137.0462, 63.3654]
    assert f"{info[0]['bytes_per_image']:.1f}" == "2137.0"
    assert [r["top1"] for r in info] == [0.797692, 0.206923]


def test_record_says_whether_the_weights_tag_changed(tmp_path, capsys):
    """Recording the same measurements twice leaves the file and its tag as they were, and says so."""
    from conftest import make_tiny_ladder
    from featcodec.cli import _record_measurements
    from featcodec.ladder import load_ladder

    path = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "tiny.safetensors")
    points = [{"method": "featcodec", "rate": k, "bytes_per_image": 100.0 + k, "top1": 0.5} for k in (0, 1)]
    result = {"points": points, "images": 1300, "uncompressed": {"top1": 0.824615}}
    _record_measurements(load_ladder(path), "featcodec", result, tmp_path / "val")
    first = capsys.readouterr().err
    before = path.read_bytes()
    _record_measurements(load_ladder(path), "featcodec", result, tmp_path / "val")
    second = capsys.readouterr().err
    assert "new weights tag" in first
    assert "weights tag unchanged" in second and path.read_bytes() == before


def test_eval_cli_max_bytes_implies_sweep(labelled_folder, stage3_weights, capsys):
    code = main(["eval", "--data", str(labelled_folder), "--weights", str(stage3_weights), "--max-bytes", "100000",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    rungs = [p["rate"] for p in result["points"] if p["method"] == "featcodec"]
    assert rungs == list(range(len(rungs))) and len(rungs) > 1  # every rung, as with --sweep
    (choice,) = result["max_bytes"]
    assert choice["max_bytes"] == 100000 and choice["rungs"] == [0] * (len(rungs) - 1) + [2]  # both at the top
    top = [p for p in result["points"] if p["rate"] == rungs[-1]][0]
    assert top["bytes_per_image"] <= choice["largest_stream"] < 2 * top["bytes_per_image"]
    assert "--max-bytes 100000: images per rate {" in captured.err
    assert main(["eval", "--complexity", "--max-bytes", "200"]) == 2
    assert "leave out --max-bytes" in capsys.readouterr().err
