import os
import subprocess
import sys

import pytest
import torch

from conftest import CHELSEA, COFFEE, make_tiny_ladder
from featcodec import bitstream
from featcodec.bitstream import BitstreamError
from featcodec.codec import Codec, decode
from featcodec.ladder import LadderError


def test_same_image_gives_identical_bytes(codec):
    first = codec.encode([COFFEE], rate=1)
    second = codec.encode([COFFEE], rate=1)
    assert first == second
    assert codec.encode([COFFEE], rate=0) != first


def test_one_record_per_image_and_sizes_add_up(codec, generated_image):
    data = codec.encode([COFFEE, CHELSEA, generated_image], rate=0)
    records = bitstream.read_stream(data)
    assert [r.image_size for r in records] == [(600, 400), (451, 300), (260, 180)]
    results = codec.decode(data)
    assert sum(r.bytes for r in results) == len(data)
    assert all(r.features.shape == (80, 14, 14) for r in results)
    assert all(len(r.top(5)) == 5 for r in results)


def test_decoded_features_equal_bu_reconstruction(codec):
    x, size = codec.preprocess(COFFEE)
    data = codec.encode([COFFEE], rate=1)
    with torch.no_grad():
        split_tensor = codec.model.head(x.unsqueeze(0))
        unit = codec.ladder.rung(1)
        expected = unit.decompress(unit.compress(split_tensor)["strings"], unit.latent_shape())["x_hat"][0]
    assert torch.equal(codec.decode(data)[0].features, expected)


def test_decoding_in_another_process_is_bit_identical(codec, stage3_weights, tmp_path):
    from safetensors.torch import load_file

    data = codec.encode([COFFEE, CHELSEA], rate=1)
    stream = tmp_path / "two.fcb"
    stream.write_bytes(data)
    out = tmp_path / "features.safetensors"
    script = (
        "import sys; from featcodec.cli import main; "
        f"sys.exit(main(['decode', {str(stream)!r}, '--weights', {str(stage3_weights)!r}, "
        f"'--features', {str(out)!r}, '--json']))"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, env=os.environ.copy())
    saved = load_file(str(out))
    for result in codec.decode(data):
        assert torch.equal(saved[f"record{result.index}"], result.features)


def test_stream_from_other_weights_is_refused(codec, tmp_path):
    other = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "other.safetensors", seed=7)
    data = Codec.load("efficientnet_lite0", "stage3", weights=other).encode([COFFEE], rate=0)
    with pytest.raises(BitstreamError, match="other weights"):
        codec.decode(data)


def test_bad_rate_index(codec):
    with pytest.raises(LadderError, match="rate 5 is out of range"):
        codec.encode([COFFEE], rate=5)


def test_module_level_decode_picks_the_codec_from_the_header(codec, weights_dir):
    stage5 = Codec.load("efficientnet_lite0", "stage5", weights=weights_dir / "efficientnet_lite0" / "stage5.safetensors")
    data = stage5.encode([COFFEE], rate=0)
    results = decode(data, weights=weights_dir / "efficientnet_lite0" / "stage5.safetensors")
    assert results[0].features.shape == (192, 7, 7)
