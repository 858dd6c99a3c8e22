"""Batch norms folded into convolutions: the server's tails compute what the backbones do."""

import pytest
import torch
from torch import nn

from featcodec.backbones import load_split_model
from featcodec.backbones.folding import fold_batch_norms


def batch_norms(module: nn.Module) -> int:
    return sum(isinstance(layer, nn.BatchNorm2d) for layer in module.modules())


@pytest.mark.parametrize(("backbone", "split", "shape"), [
    ("efficientnet_lite0", "stage3", (80, 14, 14)),
    ("efficientnet_lite0", "stage2", (40, 28, 28)),  # a stride-2 conv with SAME padding in the tail
    ("resnet18", "layer2", (128, 28, 28)),  # random weights: only the plumbing is tested here
])
def test_folded_tail_gives_the_same_logits(backbone, split, shape):
    model = load_split_model(backbone, split, random_init=backbone != "efficientnet_lite0")
    torch.manual_seed(0)
    for norm in model.tail.modules():  # statistics far from (0, 1), so that folding them matters
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    before = {name: value.clone() for name, value in model.tail.state_dict().items()}
    folded = fold_batch_norms(model.tail)
    assert batch_norms(model.tail) > 0 and batch_norms(folded) == 0
    x = torch.rand(3, *shape)
    with torch.no_grad():
        want, got = model.tail(x), folded(x)
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
    assert all(torch.equal(value, before[name]) for name, value in model.tail.state_dict().items())


class ConvThenNorm(nn.Module):
    """A conv and an eval-mode batch norm; the subclasses wire them in ways that must not be folded."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3).eval()


class ConvOutputUsedTwice(ConvThenNorm):
    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class ConvCalledTwice(ConvThenNorm):
    def forward(self, x):
        return self.norm(self.conv(x)) + self.conv(x)


class DataDependent(ConvThenNorm):
    def forward(self, x):
        return self.norm(self.conv(x)) if x.sum() > 0 else x


def test_only_a_batch_norm_that_alone_takes_a_conv_output_is_folded():
    for kept in (ConvOutputUsedTwice().eval(), ConvCalledTwice().eval()):
        assert fold_batch_norms(kept) is kept
    untraceable = DataDependent().eval()
    assert fold_batch_norms(untraceable) is untraceable
    training = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))  # training mode: statistics still move
    assert fold_batch_norms(training) is training
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    assert batch_norms(fold_batch_norms(plain)) == 0
