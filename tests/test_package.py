"""The package face: `from featcodec import Codec`, a quiet Python API, and a one-image CLI call that
imports only what it uses (each check in a fresh interpreter, where import order is what a user gets)."""

import json
import os
import subprocess
import sys

from conftest import COFFEE, ESPRESSO, ROOT


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with Python's default warning filters (no -W, no PYTHONWARNINGS)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_codec_api_from_the_package_top_writes_nothing_to_stderr():
    result = _python(
        "import sys, featcodec\n"
        "assert 'torch' not in sys.modules  # import featcodec alone stays light\n"
        "from featcodec import Codec, DecodedImage, decode\n"
        f"data = Codec.load().encode([{str(COFFEE)!r}], rate=3)\n"
        "(image,) = decode(data)\n"
        "assert isinstance(image, DecodedImage)\n"
        "print(image.top(1)[0]['label'])\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert int(result.stdout) == ESPRESSO


def test_one_image_encode_and_decode_import_no_heavy_library(tmp_path):
    """timm, torchvision, torch_geometric, scipy.stats and compressai's model zoo cost seconds to import;
    a one-image encode or decode needs none of them."""
    stream = tmp_path / "one.fcb"
    result = _python(
        "import json, sys\n"
        "from featcodec.cli import main\n"
        f"assert main(['encode', {str(COFFEE)!r}, '--rate', '3', '-o', {str(stream)!r}]) == 0\n"
        f"assert main(['decode', {str(stream)!r}, '--json']) == 0\n"
        "heavy = ['timm', 'torchvision', 'torch_geometric', 'compressai.models', 'compressai.datasets']\n"
        "loaded = [name for name in heavy if name in sys.modules]\n"
        "stats = sys.modules.get('scipy.stats')  # a stand-in until first used: no __path__ of its own\n"
        "loaded += ['scipy.stats'] if stats is not None and '__path__' in stats.__dict__ else []\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


def test_compressai_stays_whole_for_other_code():
    """After featcodec's partial import, the rest of CompressAI is still there, quietly."""
    result = _python(
        "import featcodec.bottleneck\n"
        "import compressai, scipy.stats\n"
        "assert compressai.available_entropy_coders()[0] == 'ans'\n"
        "assert compressai.zoo.bmshj2018_factorized\n"
        "assert compressai.models.CompressionModel\n"
        "print(compressai.__version__, scipy.stats.norm.ppf(0.5))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == ["1.2.8", "0.0"]
