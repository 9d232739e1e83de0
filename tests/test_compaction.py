"""Physical compaction: outputs equal the masked mean-mode network, widths and sizes by hand."""

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from bmrs_pyro.compaction import CompactModel, Scale, compact, compression_stats, masked_dense
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier, noise_mode, noise_modules

ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def mlp_net():
    return nn.Sequential(
        nn.Linear(64, 40), nn.Tanh(), MultiplicativeNoise(40),
        nn.Linear(40, 30), nn.ReLU(), MultiplicativeNoise(30),
        nn.Linear(30, 10),
    )


def lenet_net():
    # conv -> act -> (noise) -> pool -> conv -> act -> (noise) -> pool -> flatten -> linear -> act -> linear
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), MultiplicativeNoise(6, channel_dim=1), nn.MaxPool2d(2),
        nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), MultiplicativeNoise(12, channel_dim=1), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12 * 2 * 2, 32), nn.ReLU(), MultiplicativeNoise(32),
        nn.Linear(32, 10),
    )


def bn_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), MultiplicativeNoise(8, channel_dim=1),
        nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(), MultiplicativeNoise(10, channel_dim=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 5),
    )


class ResidualNet(nn.Module):
    """conv-BN-ReLU-noise twice with an identity skip over the second block, then conv, pool, fc.

    With ``skip_before_noise`` the skip carries the first block's activation before its noise
    layer, so the pruned channels of the two noise layers do not make the sum zero.
    """

    def __init__(self, channels: int = 8, skip_before_noise: bool = False) -> None:
        super().__init__()
        c = channels
        self.skip_before_noise = skip_before_noise
        self.conv0, self.bn0, self.noise0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), MultiplicativeNoise(c, channel_dim=1)
        self.conv1, self.bn1, self.noise1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), MultiplicativeNoise(c, channel_dim=1)
        self.conv2, self.bn2, self.noise2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), MultiplicativeNoise(c, channel_dim=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        a = torch.relu(self.bn0(self.conv0(x)))
        h0 = self.noise0(a)
        h = self.noise1(torch.relu(self.bn1(self.conv1(h0))))
        h = h + (a if self.skip_before_noise else h0)
        h = self.noise2(torch.relu(self.bn2(self.conv2(h))))
        return self.fc(torch.flatten(self.pool(h), 1))


def prepare(net, x, num_classes, seed=0, keep=0.5):
    """NoisyClassifier + guide with random loc/scale, random masks (~keep), random BN stats."""
    gen = torch.Generator().manual_seed(seed)
    model = NoisyClassifier(net)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.normal_(generator=gen)
            m.bias.data.normal_(generator=gen)
    model.eval()
    pyro.clear_param_store()  # guides of earlier models in the same test share site names
    guide = AutoTruncatedLogNormal(model)
    guide(x, torch.zeros(x.shape[0], dtype=torch.long))
    with torch.no_grad():
        for name, p in guide.named_parameters():
            if "log_scales" in name:
                p.uniform_(-3.0, 0.0, generator=gen)
            elif "locs" in name:
                p.uniform_(-3.0, -0.1, generator=gen)
    for layer in noise_modules(model).values():
        mask = (torch.rand(layer.num_structures, generator=gen) < keep).float()
        mask[0], mask[1] = 1.0, 0.0  # at least one of each
        layer.mask.copy_(mask)
    return model, guide


def masked_output(model, x):
    with noise_mode(model, "mean"), torch.no_grad():
        return model.net(x)


def kept(model):
    return {site: int(layer.mask.sum()) for site, layer in noise_modules(model).items()}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Equivalence, widths, sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "graph"])
def test_mlp_equivalence_widths_params_flops(method):
    x = torch.randn(16, 64)
    model, guide = prepare(mlp_net(), x, 10, seed=1)
    c = compact(model, guide, example_input=x, method=method)
    assert c.stats["method"] == ("sequential" if method == "auto" else "graph")
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    k1, k2 = kept(model).values()
    assert 0 < k1 < 40 and 0 < k2 < 30
    assert c.stats["layers"]["net.2.theta"]["width"] == k1
    assert c.stats["layers"]["net.5.theta"]["width"] == k2
    assert all(info["folded"] for info in c.stats["layers"].values())
    expected = (64 * k1 + k1) + (k1 * k2 + k2) + (k2 * 10 + 10)
    assert n_params(c) == expected == c.stats["params_after"]
    assert c.stats["params_before"] == 64 * 40 + 40 + 40 * 30 + 30 + 30 * 10 + 10
    # torch.utils.flop_counter counts 2 * N * in * out per Linear.
    assert c.stats["flops_before"] == 2 * 16 * (64 * 40 + 40 * 30 + 30 * 10)
    assert c.stats["flops_after"] == 2 * 16 * (64 * k1 + k1 * k2 + k2 * 10)
    assert c.stats["max_abs_diff"] < ATOL
    dense = masked_dense(model, guide)
    assert n_params(dense) == c.stats["params_before"] + 40 + 30  # + the two full-width Scales
    torch.testing.assert_close(dense(x), masked_output(model, x), atol=ATOL, rtol=0)


def test_mlp_folding_matches_hand_formula():
    # W3 (m2 * relu(W2 (m1 * tanh(W1 x + b1)) + b2)) + b3 with m = E[theta] * mask, from the
    # guide's truncated log-normal posterior mean.
    x = torch.randn(8, 64)
    model, guide = prepare(mlp_net(), x, 10, seed=2)
    net = model.net
    m1 = guide.posterior("net.2.theta").mean * net[2].mask
    m2 = guide.posterior("net.5.theta").mean * net[5].mask
    with torch.no_grad():
        h = m1 * torch.tanh(net[0](x))
        h = m2 * torch.relu(net[3](h))
        expected = net[6](h)
    torch.testing.assert_close(compact(model, guide)(x), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["auto", "graph"])
def test_lenet_equivalence_and_sizes(method):
    x = torch.randn(12, 1, 8, 8)
    model, guide = prepare(lenet_net(), x, 10, seed=3)
    c = compact(model, guide, example_input=x, method=method)
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    k1, k2, k3 = kept(model).values()
    widths = [info["width"] for info in c.stats["layers"].values()]
    assert widths == [k1, k2, k3]
    convs = [m for m in c.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in c.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(1, k1), (k1, k2)]
    assert [(m.in_features, m.out_features) for m in linears] == [(k2 * 4, k3), (k3, 10)]
    expected = (k1 * 9 + k1) + (k2 * k1 * 9 + k2) + (k2 * 4 * k3 + k3) + (k3 * 10 + 10)
    assert n_params(c) == expected
    # conv FLOPs: 2 * N * C_out * H * W * C_in * 3 * 3 (8x8 then 4x4 maps), Linear as above.
    flops = 2 * 12 * (k1 * 64 * 1 * 9 + k2 * 16 * k1 * 9 + k2 * 4 * k3 + k3 * 10)
    assert c.stats["flops_after"] == flops
    assert not any(isinstance(m, (Scale, MultiplicativeNoise)) for m in c.modules())


@pytest.mark.parametrize("method", ["auto", "graph"])
def test_batchnorm_net_drops_filters_bn_entries_and_next_inputs(method):
    x = torch.randn(6, 3, 6, 6)
    model, guide = prepare(bn_net(), x, 5, seed=4)
    model.train()  # compaction works on the eval-mode function whatever the model's mode
    c = compact(model, guide, example_input=x, method=method)
    model.eval()
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    k1, k2 = kept(model).values()
    bns = [m for m in c.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [b.num_features for b in bns] == [k1, k2]
    assert [b.running_mean.numel() for b in bns] == [k1, k2]
    expected = (k1 * 27 + k1) + 2 * k1 + (k2 * k1 * 9 + k2) + 2 * k2 + (5 * k2 + 5)
    assert n_params(c) == expected
    assert not c.training


def test_residual_net_prunes_coupled_channels_together():
    x = torch.randn(4, 3, 8, 8)
    model, guide = prepare(ResidualNet(8), x, 5, seed=5)
    c = compact(model, guide, example_input=x)
    assert c.stats["method"] == "graph"
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    layers = noise_modules(model)
    m0, m1, m2 = (layers[f"net.noise{i}.theta"].mask.bool() for i in range(3))
    # noise0's output feeds conv1 and the sum; noise1's only the sum: a channel of that residual
    # stream goes only where it is pruned in both.
    w = int((m0 | m1).sum())
    k2 = int(m2.sum())
    assert 0 < w < 8 and int(m0.sum()) < w  # some channel is pruned in noise0 but not noise1
    s = c.stats["layers"]
    assert s["net.noise0.theta"]["width"] == s["net.noise1.theta"]["width"] == w
    assert s["net.noise2.theta"]["width"] == k2
    assert not s["net.noise0.theta"]["folded"] and not s["net.noise1.theta"]["folded"]
    assert s["net.noise2.theta"]["folded"]
    # conv0 (3->w) bn0, Scale0, conv1 (w->w) bn1, Scale1, conv2 (w->k2) bn2, fc (k2->5)
    expected = (w * 27 + w) + 2 * w + w + (w * w * 9 + w) + 2 * w + w + (k2 * w * 9 + k2) + 2 * k2 + (5 * k2 + 5)
    assert n_params(c) == expected


def test_residual_skip_before_noise_keeps_the_coupled_group():
    # The skip adds conv0's activation *before* noise0, so no channel of the stream is zero:
    # nothing of the coupled group may go, yet the result stays exact.
    x = torch.randn(4, 3, 8, 8)
    model, guide = prepare(ResidualNet(8, skip_before_noise=True), x, 5, seed=6)
    c = compact(model, guide, example_input=x)
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    s = c.stats["layers"]
    assert s["net.noise0.theta"]["width"] == s["net.noise1.theta"]["width"] == 8
    assert s["net.noise2.theta"]["width"] == kept(model)["net.noise2.theta"]


def test_zoo_resnet_lenet_mlp():
    from bmrs_pyro.models import lenet5, mlp, resnet

    for builder, x in [
        (lambda: resnet(8, 10, 3, width=4), torch.randn(3, 3, 8, 8)),
        (lambda: lenet5(1, 10, 8), torch.randn(3, 1, 8, 8)),
        (lambda: mlp(64, 10, hidden=(20, 20)), torch.randn(3, 1, 8, 8)),
        (lambda: lenet5(1, 10, 8, norm="batch"), torch.randn(3, 1, 8, 8)),
        (lambda: mlp(64, 10, hidden=(20, 20), norm="batch"), torch.randn(3, 1, 8, 8)),
    ]:
        zoo = builder()
        for bn in (m for m in zoo.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            # Statistics and affine parameters away from the identity, so dropped entries matter.
            with torch.no_grad():
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()
        model, guide = prepare(zoo.net, x, 10, seed=7)
        c = compact(model, guide, example_input=x)
        torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
        # Every zoo noise layer sits on channels that feed a single layer: all can go.
        assert {s: i["width"] for s, i in c.stats["layers"].items()} == kept(model)


@pytest.mark.parametrize("heads_kept", ["random", "none"])
def test_zoo_vit_mlp_units_and_heads_go(heads_kept):
    # Linear on (N, T, D) tokens: the MLP hidden units feed only fc2 and are removed by the graph
    # engine; a head's factor multiplies a reshaped (N, heads, T, d) tensor no channel stands for,
    # so the attention module removes its heads itself (compact_structures).
    from bmrs_pyro.models import vit

    x = torch.randn(3, 1, 8, 8)
    dim, heads, mlp_dim = 16, 4, 24
    model, guide = prepare(vit(depth=2, dim=dim, heads=heads, mlp_dim=mlp_dim).net, x, 10, seed=15)
    head_sites = [f"net.blocks.{i}.attn.head_noise.theta" for i in range(2)]
    layers = noise_modules(model)
    layers[head_sites[0]].mask.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    if heads_kept == "none":
        layers[head_sites[1]].mask.zero_()
    c = compact(model, guide, example_input=x)
    assert c.stats["method"] == "graph"
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    s = c.stats["layers"]
    for i in range(2):
        mlp_site = f"net.blocks.{i}.mlp.noise.theta"
        assert s[mlp_site]["width"] == kept(model)[mlp_site] < mlp_dim and s[mlp_site]["folded"]
    hd = dim // heads
    widths = [s[site]["width"] for site in head_sites]
    assert widths[0] == 2 and s[head_sites[0]]["folded"]
    assert widths[1] == (1 if heads_kept == "none" else kept(model)[head_sites[1]])  # placeholder head
    for i, k in enumerate(widths):
        attn = c.body.blocks[i].attn
        assert attn.heads == k and isinstance(attn.head_noise, nn.Identity)
        assert attn.qkv.weight.shape == (3 * k * hd, dim) and attn.proj.weight.shape == (dim, k * hd)
    assert not any(isinstance(m, Scale) for m in c.modules())
    assert n_params(c) < n_params(model.net)


# ---------------------------------------------------------------------------------------------
# Placement cases and zero width
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "graph"])
def test_scale_kept_where_it_cannot_be_folded(method):
    x = torch.randn(5, 6)
    cases = {
        # noise before tanh: pruned units are still zero after tanh, the factor is not
        "before_tanh": (nn.Sequential(nn.Linear(6, 10), MultiplicativeNoise(10), nn.Tanh(), nn.Linear(10, 3)), True),
        # sigmoid(0) = 1/2: pruned units become constants and must stay
        "before_sigmoid": (nn.Sequential(nn.Linear(6, 10), MultiplicativeNoise(10), nn.Sigmoid(), nn.Linear(10, 3)), False),
        # the network output itself: every channel stays
        "at_the_end": (nn.Sequential(nn.Linear(6, 10), nn.ReLU(), MultiplicativeNoise(10)), False),
    }
    for name, (net, removable) in cases.items():
        model, guide = prepare(net, x, 3, seed=8)
        c = compact(model, guide, example_input=x, method=method)
        torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0, msg=name)
        (info,) = c.stats["layers"].values()
        assert info["width"] == (info["kept"] if removable else 10), name
        assert not info["folded"] and sum(isinstance(m, Scale) for m in c.modules()) == 1, name


@pytest.mark.parametrize("method", ["auto", "graph"])
def test_layer_pruned_to_zero_width_keeps_one_zero_placeholder(method):
    x = torch.randn(5, 64)
    model, guide = prepare(mlp_net(), x, 10, seed=9)
    noise_modules(model)["net.5.theta"].mask.zero_()
    c = compact(model, guide, example_input=x, method=method)
    out = c(x)
    # The last hidden layer outputs zeros, so the logits are the output layer's bias.
    torch.testing.assert_close(out, model.net[6].bias.detach().expand(5, 10), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, masked_output(model, x), atol=ATOL, rtol=0)
    info = c.stats["layers"]["net.5.theta"]
    assert info["kept"] == 0 and info["width"] == 1
    assert any("every structure pruned" in n for n in c.stats["notes"])


def test_zero_width_conv_and_residual_group():
    x = torch.randn(4, 3, 6, 6)
    model, guide = prepare(bn_net(), x, 5, seed=10)
    noise_modules(model)["net.3.theta"].mask.zero_()
    c = compact(model, guide, example_input=x)
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    assert c.stats["layers"]["net.3.theta"]["width"] == 1
    model, guide = prepare(ResidualNet(6), x, 5, seed=11)
    for i in (0, 1):
        noise_modules(model)[f"net.noise{i}.theta"].mask.zero_()
    c = compact(model, guide, example_input=x)
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    assert c.stats["layers"]["net.noise0.theta"]["width"] == 1


# ---------------------------------------------------------------------------------------------
# The compacted object
# ---------------------------------------------------------------------------------------------


def test_plain_module_saveable_and_default_guide(tmp_path):
    x = torch.randn(7, 1, 8, 8)
    model, guide = prepare(lenet_net(), x, 10, seed=12)
    c = compact(model, example_input=x)  # E[theta] from the guide attached to the layers
    torch.testing.assert_close(c(x), compact(model, guide)(x), atol=0, rtol=0)
    assert isinstance(c, CompactModel)
    assert not any(isinstance(m, PyroModule) for m in c.modules())
    assert all(type(v) is torch.Tensor for v in c.state_dict().values())
    path = tmp_path / "compact.pt"
    torch.save(c, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x), c(x), atol=0, rtol=0)
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    fresh = compact(model)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    text = c.report()
    assert "parameters" in text and "FLOPs" in text and "net.2.theta" in text


def test_compression_stats_and_no_example_input():
    x = torch.randn(4, 64)
    model, guide = prepare(mlp_net(), x, 10, seed=13)
    stats = compression_stats(model, guide)
    assert stats["flops_before"] is None and stats["max_abs_diff"] is None
    assert 0 < stats["params_ratio"] < 1
    # compacting must not touch the model
    assert model.net[0].weight.shape == (40, 64) and noise_modules(model)["net.2.theta"].mode == "sample"


def test_set_posterior_mean_without_guide():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), MultiplicativeNoise(6), nn.Linear(6, 2))
    model = NoisyClassifier(net)
    net[2].set_posterior_mean(torch.tensor([0.5, 2.0, 0.0, 1.0, 3.0, 0.25]))
    net[2].mask.copy_(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    c = compact(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(c(x), masked_output(model, x), atol=ATOL, rtol=0)
    # E[theta] = 0 underflow counts as pruned too: units 0, 1, 4 remain
    assert c.stats["layers"]["net.2.theta"]["width"] == 3


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="posterior"):
        compact(NoisyClassifier(mlp_net()))
    model, guide = prepare(ResidualNet(4), x, 5, seed=14)
    with pytest.raises(ValueError, match="example_input"):
        compact(model, guide)
    with pytest.raises(ValueError, match="method='graph'"):
        compact(model, guide, example_input=x, method="sequential")
    with pytest.raises(ValueError, match="method"):
        compact(model, guide, method="fast")
    other, other_guide = prepare(mlp_net(), torch.randn(2, 64), 10)
    with pytest.raises(ValueError, match="no site"):
        compact(model, other_guide, example_input=x)
    with pytest.raises(ValueError, match="nn.Module"):
        compact("net")


def test_bayesian_weights_and_sample_sites_rejected(noisy_mlp):
    layer = PyroModule[nn.Linear](4, 3)
    layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([3, 4]).to_event(2))
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), MultiplicativeNoise(4), layer)
    net[2].set_posterior_mean(torch.ones(4))
    with pytest.raises(ValueError, match="Bayesian"):
        compact(NoisyClassifier(net))
    # A model whose forward declares the likelihood (issue 12: used to be refused) compacts its
    # network part x -> logits.
    model = noisy_mlp(sizes=(64, 8, 10))
    for layer in noise_modules(model).values():
        layer.set_posterior_mean(torch.ones(layer.num_structures))
    x = torch.randn(5, 64)
    small = compact(model, example_input=x[:2])
    with torch.no_grad(), noise_mode(model, "mean"):
        expected = model(x)
    assert torch.allclose(small(x), expected, atol=1e-5)
    pyro.clear_param_store()
