"""The huffman-bu anchor: the static Huffman coder, its BU, training it and measuring it."""

import json
import math
import shutil
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from conftest import CHELSEA, COFFEE, ESPRESSO, make_image_folder
from featcodec import bitstream, huffman
from featcodec.bottleneck import BottleneckConfig, HuffmanBottleneckUnit, make_unit
from featcodec.cli import main
from featcodec.codec import Codec
from featcodec.evaluate import evaluate, labelled_images
from featcodec.huffman import HuffmanError
from featcodec.ladder import LadderError, load_ladder, save_ladder, untrained_ladder

HUFFMAN_BU = BottleneckConfig(
    in_channels=192, out_size=(7, 7), latent_channels=6, stride=1, entropy="huffman", quant_step=0.5
)


def _kraft(lengths) -> Fraction:
    return sum((Fraction(1, 2 ** int(n)) for n in lengths if n), Fraction(0))


def test_code_lengths_known_answers():
    # counts 1,1,2,4: merge 1+1, then 2+2, then 4+4 -> depths 3,3,2,1
    assert huffman.code_lengths([1, 1, 2, 4]).tolist() == [3, 3, 2, 1]
    assert huffman.code_lengths([5, 5, 5, 5]).tolist() == [2, 2, 2, 2]
    assert huffman.code_lengths([0, 7, 0]).tolist() == [0, 1, 0]  # one symbol: the one-bit code "0"
    assert huffman.code_lengths([3, 0, 1]).tolist() == [1, 0, 1]
    codes = huffman.canonical_codes([3, 3, 2, 1])
    assert codes.tolist() == [0b110, 0b111, 0b10, 0b0]  # shortest first, then by symbol


def test_code_lengths_are_limited_and_complete():
    fibonacci = [1, 1]
    while len(fibonacci) < 30:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    free = huffman.code_lengths(fibonacci, max_length=40)
    assert free.max() == 29  # a Fibonacci histogram gives the deepest possible tree
    limited = huffman.code_lengths(fibonacci, max_length=8)
    assert limited.max() <= 8 and _kraft(limited) == 1
    with pytest.raises(HuffmanError, match="non-zero"):
        huffman.code_lengths([0, 0])
    with pytest.raises(HuffmanError, match="cannot have codes"):
        huffman.code_lengths(np.ones(300, dtype=int), max_length=8)


def test_round_trip_and_size_match_an_independent_count():
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.full(40, 0.3))
    symbols = rng.choice(40, 5000, p=probabilities)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=40) + 1)
    data = huffman.encode(symbols, lengths)
    assert len(data) == math.ceil(int(lengths[symbols].astype(int).sum()) / 8)
    assert huffman.decode(data, huffman.decoding_table(lengths), symbols.size).tolist() == symbols.tolist()
    # the code is prefix-free: no code is the start of another
    codes = huffman.canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in range(40)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    # a skewed source costs close to its entropy, well below the 6 bits of a flat code
    entropy_bits = -(np.log2(probabilities[symbols])).sum()
    assert 8 * len(data) < 1.1 * entropy_bits + 5000 * 0.1


def test_malformed_payloads_and_tables_are_refused():
    lengths = np.array([1, 2, 3, 3], dtype=np.uint8)  # codes 0, 10, 110, 111
    table = huffman.decoding_table(lengths)
    data = huffman.encode([3, 3, 0, 0], lengths)  # 111 111 0 0 -> one byte exactly
    assert data == bytes([0b11111100]) and huffman.decode(data, table, 4).tolist() == [3, 3, 0, 0]
    assert huffman.encode([1], lengths) == bytes([0b10000000])  # 10, padded with zeros
    with pytest.raises(HuffmanError, match="ends after"):
        huffman.decode(data, table, 5)
    with pytest.raises(HuffmanError, match="after its last symbol"):
        huffman.decode(data + b"\x00", table, 4)
    with pytest.raises(HuffmanError, match="after its last symbol"):
        huffman.decode(bytes([0b10100000]), table, 1)  # a stray 1 in the padding
    with pytest.raises(HuffmanError, match="no Huffman code"):
        huffman.encode([4], lengths)
    with pytest.raises(HuffmanError, match="longer than 4 symbols can be"):
        huffman.decode(bytes(100), table, 4)  # refused before any work: at most 4 * 3 bits
    for bad in ([1, 1, 1], [2, 2, 2], [0, 0], [17, 1], []):
        with pytest.raises(HuffmanError):
            huffman.check_lengths(np.array(bad))
    one_symbol = huffman.decoding_table([0, 1])
    with pytest.raises(HuffmanError, match="no code"):
        huffman.decode(bytes([0b10000000]), one_symbol, 1)


def test_huffman_bu_codes_its_quantized_latent_exactly():
    torch.manual_seed(0)
    unit = make_unit(HUFFMAN_BU)
    assert isinstance(unit, HuffmanBottleneckUnit) and not unit.has_coding_tables()
    features = torch.randn(16, 192, 7, 7)
    unit.train()
    unit(features)  # one pass in train mode moves the BN statistics
    unit.eval()
    unit.build_coding_tables(features)
    assert unit.has_coding_tables()
    x = torch.randn(2, 192, 7, 7)
    coded = unit.compress(x)
    assert coded["shape"] == (7, 7) and len(coded["strings"][0]) == 2
    latent = unit.decompress_latent(coded["strings"], coded["shape"])
    assert torch.equal(latent, unit.quantized_latent(x))
    assert torch.all(latent / HUFFMAN_BU.quant_step == torch.round(latent / HUFFMAN_BU.quant_step))
    rebuilt = unit.decompress(coded["strings"], coded["shape"])["x_hat"]
    assert rebuilt.shape == x.shape
    # each string is exactly the Huffman code of its symbols, padded to a byte
    symbols = (latent / HUFFMAN_BU.quant_step).long()
    for item, data in zip(symbols, coded["strings"][0]):
        assert len(data) == math.ceil(int(unit.code_lengths[item.flatten()].long().sum()) / 8)
    with pytest.raises(HuffmanError):
        unit.decompress_latent([[coded["strings"][0][0][:-1]]], coded["shape"])


def test_straight_through_quantizer_passes_gradients():
    torch.manual_seed(0)
    unit = make_unit(HUFFMAN_BU).train()
    x = torch.randn(4, 192, 7, 7)
    output = unit(x)
    (torch.mean((output["x_hat"] - x) ** 2) + 0.01 * output["bits"]).backward()
    assert unit.g_a[0].weight.grad is not None and unit.g_a[0].weight.grad.abs().sum() > 0
    assert output["bits"].item() >= 0  # the rate proxy of a ReLU latent


def test_huffman_ladder_saves_loads_and_refuses_a_broken_table(tmp_path):
    ladder = untrained_ladder("efficientnet_lite0", "stage5", HUFFMAN_BU, [1.0, 2.0])
    path = tmp_path / "h.safetensors"
    save_ladder(ladder, path)
    loaded = load_ladder(path)
    assert loaded.config == HUFFMAN_BU and isinstance(loaded.rungs[1], HuffmanBottleneckUnit)
    assert torch.equal(loaded.rungs[0].code_lengths, ladder.rungs[0].code_lengths)

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors["rung1.code_lengths"] = torch.full_like(tensors["rung1.code_lengths"], 1)  # Kraft sum 128
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    with pytest.raises(LadderError, match="rung 1 lacks valid coding tables"):
        load_ladder(tmp_path / "broken.safetensors")


def test_train_entropy_huffman_cli_writes_a_ladder_that_encode_and_decode_find(tmp_path, capsys, monkeypatch):
    images = make_image_folder(tmp_path / "images", 6)
    weights_root = tmp_path / "weights" / "efficientnet_lite0"
    out = weights_root / "stage5-huffman-bu.safetensors"
    args = ["train", "--data", str(images), "--split", "stage5", "--lambdas", "0.5,50", "--steps", "4",
            "--batch-size", "3", "--views", "1", "--entropy", "huffman", "--latent-channels", "6",
            "--stride", "1", "--quant-step", "0.5", "--distortion", "kd", "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.chdir(tmp_path)  # the default --out is weights/<backbone>/<split>-huffman-bu.safetensors
    assert main(args) == 0, capsys.readouterr().err
    assert "-> weights/efficientnet_lite0/stage5-huffman-bu.safetensors" in capsys.readouterr().err
    ladder = load_ladder(out)
    assert ladder.config.entropy == "huffman" and ladder.config.quant_step == 0.5
    assert all(unit.has_coding_tables() for unit in ladder.rungs)
    # the table was built on the training latents: the commonest symbol has the shortest code
    assert int(ladder.rungs[0].code_lengths.min()) < int(ladder.rungs[0].code_lengths.max())

    for bad, message in [(["--entropy", "arith"], "unknown --entropy 'arith'"), (["--quant-step", "0"], "--quant-step")]:
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    # encode with the huffman ladder; decode finds it among the shipped ladders by the stream's weights tag
    stream = tmp_path / "x.fcb"
    assert main(["encode", str(COFFEE), "--split", "stage5", "--weights", str(out), "--rate", "1", "-o", str(stream)]) == 0
    capsys.readouterr()
    from conftest import make_tiny_ladder

    make_tiny_ladder("efficientnet_lite0", "stage5", weights_root / "stage5.safetensors")  # featcodec's own
    monkeypatch.setenv("FEATCODEC_WEIGHTS", str(tmp_path / "weights"))
    assert main(["decode", str(stream), "--json"]) == 0
    decoded = json.loads(capsys.readouterr().out)[0]
    expected = Codec.load("efficientnet_lite0", "stage5", weights=out).decode(stream.read_bytes())[0]
    assert decoded["rate"] == 1 and decoded["split"] == "stage5"
    assert decoded["top"][0]["label"] == expected.top(1)[0]["label"]
    assert decoded["top"][0]["prob"] == pytest.approx(expected.top(1)[0]["prob"], rel=1e-5)


@pytest.fixture(scope="module")
def huffman_stage3(tmp_path_factory):
    config = BottleneckConfig(in_channels=80, out_size=(14, 14), latent_channels=4, stride=2, entropy="huffman")
    ladder = untrained_ladder("efficientnet_lite0", "stage3", config, [1.0, 2.0], seed=3)
    path = tmp_path_factory.mktemp("huffman") / "stage3-huffman-bu.safetensors"
    save_ladder(ladder, path)
    return load_ladder(path)


def test_huffman_bu_baseline_bytes_match_an_independent_count(codec, huffman_stage3, tmp_path):
    (tmp_path / "labels.csv").write_text(f"file,label\ncoffee.jpg,{ESPRESSO}\n")
    shutil.copy(COFFEE, tmp_path / "coffee.jpg")
    result = evaluate(codec, labelled_images(tmp_path), [0], baselines=["huffman-bu"], huffman_ladder=huffman_stage3)
    points = [p for p in result["points"] if p["method"] == "huffman-bu"]
    assert [p["setting"] for p in points] == ["rate 0", "rate 1"] and [p["rate"] for p in points] == [0, 1]
    with torch.no_grad():
        x, size = codec.preprocess(COFFEE)
        split = codec.model.head(x.unsqueeze(0))
    for unit, point in zip(huffman_stage3.rungs, points):
        with torch.no_grad():
            symbols = torch.round(unit.g_a(split) / unit.config.quant_step).clamp(0, 255).long()
        payload = math.ceil(int(unit.code_lengths[symbols.flatten()].long().sum()) / 8)
        assert point["payload_bytes_per_image"] == payload
        record = bitstream.Record(codec.spec.id, codec.split.id, 0, huffman_stage3.weights_tag, size, (7, 7),
                                  (b"\x00" * payload,))
        assert point["bytes_per_image"] == len(bitstream.write_stream([record]))
    assert set(result["bd_rate"]) == {"huffman-bu"}


def test_eval_cli_huffman_bu_baseline(tmp_path, stage3_weights, huffman_stage3, capsys):
    root = tmp_path / "val"
    root.mkdir()
    shutil.copy(COFFEE, root / "a.jpg")
    shutil.copy(CHELSEA, root / "b.jpg")
    (root / "labels.csv").write_text(f"file,label\na.jpg,{ESPRESSO}\nb.jpg,285\n")
    args = ["eval", "--data", str(root), "--sweep", "--json", "--weights", str(stage3_weights),
            "--baselines", "huffman-bu", "--huffman-weights", str(huffman_stage3.path)]
    assert main(args) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert [p["method"] for p in result["points"]] == ["featcodec", "featcodec", "huffman-bu", "huffman-bu"]
    assert "huffman-bu" in result["bd_rate"]
    # --record stores each ladder's own figures in its own file
    own, anchor = tmp_path / "own.safetensors", tmp_path / "anchor.safetensors"
    shutil.copy(stage3_weights, own)
    shutil.copy(huffman_stage3.path, anchor)
    recorded = ["eval", "--data", str(root), "--sweep", "--json", "--weights", str(own), "--baselines", "huffman-bu",
                "--huffman-weights", str(anchor), "--record"]
    assert main(recorded) == 0, capsys.readouterr().err
    points = json.loads(capsys.readouterr().out)["points"]
    for path, method in ((own, "featcodec"), (anchor, "huffman-bu")):
        expected = [round(p["bytes_per_image"], 4) for p in points if p["method"] == method]
        assert [r["bytes_per_image"] for r in load_ladder(path).rung_info] == expected
    assert main(args[:-2] + ["--huffman-weights", str(stage3_weights)]) == 2
    assert "is not a huffman ladder" in capsys.readouterr().err
    assert main(args[:-4] + ["--huffman-weights", str(huffman_stage3.path)]) == 2
    assert "--huffman-weights needs" in capsys.readouterr().err


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), count=st.integers(0, 200))
def test_arbitrary_payloads_decode_or_raise_huffman_error(data, count):
    lengths = huffman.code_lengths(np.arange(1, 41))  # 40 symbols, codes of 4 to 7 bits
    try:
        symbols = huffman.decode(data, huffman.decoding_table(lengths), count)
    except HuffmanError:
        return
    assert len(symbols) == count and huffman.encode(symbols, lengths) == data  # accepted means canonical
