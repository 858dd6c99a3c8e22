import json

from featcodec.cli import main
from featcodec.complexity import cost_report


def test_cost_report_counts_the_bu_encoder_macs(codec):
    report = cost_report(codec, rate=0, repeats=1)
    parts = {part["part"]: part for part in report["parts"]}
    assert list(parts) == ["head", "bu encoder", "bu decoder", "tail"]
    # tiny ladder: 80 -> 16 (3x3, 14x14), GDN's 1x1 16 -> 16 (14x14), 16 -> 8 (3x3, stride 2, 7x7)
    assert parts["bu encoder"]["macs"] == 14 * 14 * 16 * 80 * 9 + 14 * 14 * 16 * 16 + 7 * 7 * 8 * 16 * 9
    assert parts["bu encoder"]["params"] == sum(
        p.numel() for p in list(codec.ladder.rung(0).g_a.parameters()) + list(codec.ladder.rung(0).entropy_bottleneck.parameters())
    )
    backbone = sum(p.numel() for p in codec.model.parameters())
    assert report["backbone_params"] == backbone == parts["head"]["params"] + parts["tail"]["params"]
    assert report["ladder_percent_of_backbone"] == 100 * report["ladder_params"] / backbone
    # head + tail = the whole EfficientNet-Lite0 at 224x224: about 0.4 GMACs
    assert 0.3e9 < parts["head"]["macs"] + parts["tail"]["macs"] < 0.5e9
    assert all(part["ms"] > 0 for part in parts.values())


def test_eval_complexity_cli(stage3_weights, capsys):
    assert main(["eval", "--complexity", "--weights", str(stage3_weights), "--rate", "1", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["rate"] == 1 and report["split"] == "stage3" and "ladder:" in captured.err
    assert main(["eval", "--complexity", "--weights", str(stage3_weights), "--rate", "7"]) == 2
    assert main(["eval", "--complexity", "--data", ".", "--weights", str(stage3_weights)]) == 2
    assert main(["eval", "--complexity", "--plot", "x.png", "--weights", str(stage3_weights)]) == 2
    assert "leave out --plot" in capsys.readouterr().err
    assert main(["eval", "--sweep", "--weights", str(stage3_weights)]) == 2
    assert "--data" in capsys.readouterr().err
