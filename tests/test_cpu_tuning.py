"""tune_for_cpu: exact rewrites (pooling, commuting modules, convolution kernels) for CPU inference."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bmrs_pyro.compaction import Scale, compact, masked_dense
from bmrs_pyro.cpu_tuning import MaxPool2x2, NativeConv2d, tune_for_cpu
from bmrs_pyro.models import lenet5
from bmrs_pyro.nn import noise_modules


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 9), (5, 1, 2, 3), (2, 2, 5, 4)])
def test_maxpool2x2_equals_torch_maxpool(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[0, 0, :2, :2] = 1.5  # ties inside a window
    assert torch.equal(MaxPool2x2()(x), F.max_pool2d(x, 2))


def test_pointwise_modules_moved_past_the_pool_give_the_same_function():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 10, 10)
    scale = Scale(torch.tensor([0.5, 0.0, 2.0]), channel_dim=1)
    seq = nn.Sequential(nn.ReLU(), scale, nn.MaxPool2d(2))
    tuned = tune_for_cpu(seq, x, repeats=1)
    assert tuned.tuning["pools"] == 1
    pool = [m for m in tuned.modules() if isinstance(m, MaxPool2x2)]
    assert len(pool) == 1 and [type(m) for m in pool[0].after] == [nn.ReLU, Scale]
    with torch.no_grad():
        assert torch.allclose(tuned(x), seq(x), atol=0, rtol=0)


def test_negative_scale_and_other_pools_are_left_in_place():
    torch.manual_seed(2)
    x = torch.randn(2, 2, 9, 9)
    neg = Scale(torch.tensor([1.0, -1.0]), channel_dim=1)  # max(-x) != -max(x): must stay before
    seq = nn.Sequential(neg, nn.MaxPool2d(2), nn.Tanh(), nn.MaxPool2d(3, stride=1), nn.MaxPool2d(2, ceil_mode=True))
    tuned = tune_for_cpu(seq, x, repeats=1)
    assert tuned.tuning["pools"] == 1
    kinds = [type(m) for m in tuned]
    assert kinds == [Scale, MaxPool2x2, nn.Tanh, nn.MaxPool2d, nn.MaxPool2d]
    assert len(tuned[1].after) == 0
    with torch.no_grad():
        assert torch.equal(tuned(x), seq(x))


def test_nested_pool_outside_a_sequential_is_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)
            self.pool = nn.MaxPool2d(kernel_size=(2, 2), stride=2)

        def forward(self, x):
            return self.pool(torch.relu(self.conv(x))).flatten(1)

    torch.manual_seed(3)
    net, x = Net().eval(), torch.randn(4, 1, 11, 11)
    tuned = tune_for_cpu(net, x, repeats=1)
    assert isinstance(tuned.pool, MaxPool2x2) and isinstance(net.pool, nn.MaxPool2d)  # original untouched
    with torch.no_grad():
        assert torch.allclose(tuned(x), net(x), atol=1e-6)


def test_native_conv_matches_and_restores_the_onednn_setting():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 4, 3)
    x = torch.randn(3, 2, 9, 9)
    before = torch._C._get_mkldnn_enabled()
    with torch.no_grad():
        assert torch.allclose(NativeConv2d(conv)(x), conv(x), atol=1e-5)
    assert torch._C._get_mkldnn_enabled() == before
    with pytest.raises(RuntimeError):
        NativeConv2d(conv)(torch.randn(3, 5, 9, 9))  # wrong channels: the error propagates...
    assert torch._C._get_mkldnn_enabled() == before  # ...and the setting is restored


def _pruned_lenet():
    torch.manual_seed(5)
    model = lenet5(1, 10, 28)
    gen = torch.Generator().manual_seed(0)
    for layer in noise_modules(model).values():
        s = layer.num_structures
        mask = (torch.rand(s, generator=gen) < 0.4).float()
        mask[0] = 1.0
        layer.mask.copy_(mask)
        layer.set_posterior_mean(torch.rand(s, generator=gen) * 0.9 + 0.1)
    return model


def test_tuned_lenet_dense_and_compact_equal_the_masked_model():
    model = _pruned_lenet()
    x = torch.randn(16, 1, 28, 28)
    dense = masked_dense(model)
    small = compact(model, example_input=x)
    for net in (dense, small):
        tuned = tune_for_cpu(net, x, repeats=2)
        assert tuned.tuning["pools"] == 2
        assert not any(isinstance(m, nn.MaxPool2d) for m in tuned.modules())
        assert any(isinstance(m, nn.MaxPool2d) for m in net.modules())
        for m in tuned.tuning["native_convs"]:
            assert isinstance(tuned.get_submodule(m), NativeConv2d)
        x2 = torch.randn(7, 1, 28, 28)  # another batch size than the one it was tuned on
        with torch.no_grad():
            assert torch.allclose(tuned(x2), dense(x2), atol=1e-5)


def test_bad_input_is_refused():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    x = torch.randn(2, 1, 5, 5)
    with pytest.raises(TypeError, match="nn.Module"):
        tune_for_cpu(lambda v: v, x)
    with pytest.raises(TypeError, match="tensor"):
        tune_for_cpu(conv, [1, 2])
    with pytest.raises(ValueError, match="repeats"):
        tune_for_cpu(conv, x, repeats=0)
    with pytest.raises(ValueError, match="CPU"):
        tune_for_cpu(nn.Sequential(nn.Conv2d(1, 2, 3)).to("meta"), x.to("meta"))
