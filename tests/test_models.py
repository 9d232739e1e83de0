"""The model zoo: shapes, noise placement, training, mean mode, masks, bayesianize and build."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch import nn

from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import fit
from bmrs_pyro.models import MODELS, bayesianize, build, check_model_norm, lenet5, mlp, resnet, vit
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier, noise_mode, noise_modules

NUM_CLASSES = 5

# name -> (builder of a tiny model, input shape, expected (num_structures, channel_dim) per site,
# worked out by hand from each architecture's definition). Few noise sites keep SVI cheap: the
# guide's cost grows with the number of sites.
TINY = {
    "mlp": (
        lambda: mlp(64, NUM_CLASSES, hidden=(12, 7)),
        (1, 8, 8),
        [(12, -1), (7, -1)],
    ),
    "lenet5": (
        lambda: lenet5(1, NUM_CLASSES, 8),
        (1, 8, 8),
        [(6, 1), (16, 1), (120, -1), (84, -1)],
    ),
    "resnet": (
        lambda: resnet(8, NUM_CLASSES, 3, width=2),
        (3, 8, 8),
        [(2, 1), (4, 1), (8, 1)],
    ),
    "vit": (
        lambda: vit(8, 4, 1, NUM_CLASSES, dim=8, depth=1, heads=2, mlp_dim=6),
        (1, 8, 8),
        [(2, 1), (6, -1)],
    ),
    "bayesianized": (
        lambda: bayesianize(
            nn.Sequential(
                nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(27, 9), nn.Tanh(), nn.Linear(9, NUM_CLASSES),
            ),
            classifier=True,
        ),
        (1, 8, 8),
        [(3, 1), (9, -1)],
    ),
}


def _data(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _set_random_means(model, seed=1):
    """Posterior means in [0.5, 1.5] without a guide, so mean mode is usable and not trivial."""
    g = torch.Generator().manual_seed(seed)
    for layer in noise_modules(model).values():
        layer.set_posterior_mean(0.5 + torch.rand(layer.num_structures, generator=g))


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_noise_sites(name):
    builder, shape, expected = TINY[name]
    model = builder()
    assert isinstance(model, NoisyClassifier)
    x, _ = _data(shape, n=3)
    assert model(x).shape == (3, NUM_CLASSES)
    layers = noise_modules(model)
    assert [(m.num_structures, m.channel_dim) for m in layers.values()] == expected
    assert all(site.endswith(".theta") and site.startswith("net.") for site in layers)


@pytest.mark.parametrize("name", sorted(TINY))
def test_svi_epoch_trains_and_mean_mode_uses_posterior_mean(name):
    builder, shape, _ = TINY[name]
    model = builder()
    x, y = _data(shape)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    guide = AutoTruncatedLogNormal(model)
    history = fit(model, guide, (x, y), epochs=1, batch_size=len(x), lr=1e-2, progress=False)
    assert len(history.loss) == 1
    assert all(torch.isfinite(torch.tensor(history.loss)))
    unchanged = [k for k, p in model.named_parameters() if torch.equal(p.detach(), before[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    for site in guide.site_names:
        loc, scale = guide.loc_scale(site)
        assert not torch.equal(loc, torch.zeros_like(loc)), site
    model.eval()  # BatchNorm from running statistics, so both passes below see the same network
    with torch.no_grad(), noise_mode(model, "mean"):
        first, second = model.logits(x), model.logits(x)
    assert torch.equal(first, second)
    # Independent route: the sampling path with every theta conditioned on E_q[theta].
    means = {s: guide.posterior(s).mean.detach().expand(len(x), -1) for s in guide.site_names}
    with torch.no_grad():
        conditioned = poutine.condition(model.logits, data=means)(x)
    torch.testing.assert_close(first, conditioned, atol=1e-6, rtol=1e-6)


def _producer(model, site):
    """The module whose output a noise layer multiplies (for zeroing it by hand with a hook)."""
    path = site[: -len(".theta")]
    parent_path, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if isinstance(parent, nn.Sequential):
        return parent[int(last) - 1]
    return {"noise": getattr(parent, "relu1", None) or getattr(parent, "act", None)}[last]


def _zero_channel(channel_dim, index):
    def hook(module, inputs, output):
        output = output.clone()
        output.select(channel_dim, index).zero_()
        return output

    return hook


@pytest.mark.parametrize("name", ["mlp", "lenet5", "resnet", "vit", "bayesianized"])
def test_mask_equals_zeroing_the_structure_by_hand(name):
    builder, shape, _ = TINY[name]
    model = builder().eval()
    _set_random_means(model)
    x, _ = _data(shape, n=4)
    with torch.no_grad(), noise_mode(model, "mean"):
        full = model.logits(x)
        for site, layer in noise_modules(model).items():
            if site.endswith("head_noise.theta"):
                continue  # heads: see test_vit_head_mask_removes_its_slice_of_the_projection
            index = layer.num_structures - 1
            layer.mask[index] = 0.0
            masked = model.logits(x)
            layer.mask[index] = 1.0
            handle = _producer(model, site).register_forward_hook(_zero_channel(layer.channel_dim, index))
            by_hand = model.logits(x)
            handle.remove()
            assert not torch.allclose(masked, full), site
            torch.testing.assert_close(masked, by_hand, atol=1e-6, rtol=1e-6)


def test_vit_head_mask_removes_its_slice_of_the_projection():
    model = vit(8, 4, 1, NUM_CLASSES, dim=12, depth=1, heads=3, mlp_dim=6).eval()
    _set_random_means(model)
    x, _ = _data((1, 8, 8), n=4)
    attn = model.net.blocks[0].attn
    layer = attn.head_noise
    head_dim = 12 // 3
    with torch.no_grad(), noise_mode(model, "mean"):
        full = model.logits(x)
        layer.mask[:] = torch.tensor([0.0, 1.0, 0.0])  # all heads but one
        only_one = model.logits(x)
        layer.mask[:] = torch.tensor([1.0, 1.0, 0.0])
        masked = model.logits(x)
        layer.mask[:] = 1.0

        def drop_head(module, inputs):
            (h,) = inputs
            h = h.clone()
            h[..., 2 * head_dim : 3 * head_dim] = 0.0
            return (h,)

        handle = attn.proj.register_forward_pre_hook(drop_head)
        by_hand = model.logits(x)
        handle.remove()
    assert not torch.allclose(only_one, full)
    assert not torch.allclose(masked, full)
    torch.testing.assert_close(masked, by_hand, atol=1e-6, rtol=1e-6)


def test_deeper_models_have_one_site_per_block():
    sites = noise_modules(resnet(14, 10, 3, width=2))
    assert [(m.num_structures, m.channel_dim) for m in sites.values()] == [
        (2, 1), (2, 1), (4, 1), (4, 1), (8, 1), (8, 1),
    ]
    assert list(sites)[1] == "net.layer1.1.noise.theta"
    sites = noise_modules(vit(8, 2, 1, 10, dim=12, depth=3, heads=3, mlp_dim=5))
    assert [(m.num_structures, m.channel_dim) for m in sites.values()] == [(3, 1), (5, -1)] * 3
    assert list(sites)[2:4] == ["net.blocks.1.attn.head_noise.theta", "net.blocks.1.mlp.noise.theta"]


def test_noise_is_after_each_nonlinearity():
    seq = mlp(10, 3, hidden=(4, 5), activation="relu").net
    assert [type(m) for m in seq] == [
        nn.Flatten, nn.Linear, nn.ReLU, MultiplicativeNoise, nn.Linear, nn.ReLU, MultiplicativeNoise, nn.Linear,
    ]
    seq = lenet5(1, 10, 28).net
    assert [type(m) for m in seq] == [
        nn.Conv2d, nn.ReLU, MultiplicativeNoise, nn.MaxPool2d,
        nn.Conv2d, nn.ReLU, MultiplicativeNoise, nn.MaxPool2d, nn.Flatten,
        nn.Linear, nn.ReLU, MultiplicativeNoise, nn.Linear, nn.ReLU, MultiplicativeNoise, nn.Linear,
    ]
    block = resnet(8, 10, 3, width=2).net.layer2[0]
    assert block.noise.num_structures == block.conv1.out_channels == block.bn1.num_features == 4
    # No noise on the residual stream: the stem and the block outputs are not prunable.
    assert sum(isinstance(m, MultiplicativeNoise) for m in resnet(8, 10, 3, width=2).modules()) == 3


@pytest.mark.parametrize(
    "input_size, padding, flat",
    # 28: 28-4=24 -> 12 -> 8 -> 4; 32: 28 -> 14 -> 10 -> 5 (the classic 400); 8 with padding 2:
    # 8 -> 4 -> 4 -> 2; 16 is the smallest unpadded input: 12 -> 6 -> 2 -> 1.
    [(28, None, 16 * 4 * 4), (32, None, 16 * 5 * 5), (8, None, 16 * 2 * 2), (16, None, 16),
     (28, 2, 16 * 7 * 7), ((12, 28), 2, 16 * 3 * 7)],
)
def test_lenet5_flatten_size_follows_input_size(input_size, padding, flat):
    model = lenet5(1, 10, input_size, padding=padding, width=1)
    assert model.net[9].in_features == flat
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    assert model(torch.randn(2, 1, h, w)).shape == (2, 10)
    assert lenet5(2, 10, input_size, padding=padding, width=2).net[9].in_features == 2 * flat


def test_norm_batch_puts_a_batchnorm_between_each_weight_layer_and_its_activation():
    seq = mlp(10, 3, hidden=(4, 5), activation="relu", norm="batch").net
    assert [type(m) for m in seq] == [
        nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, MultiplicativeNoise,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, MultiplicativeNoise, nn.Linear,
    ]
    assert [m.num_features for m in seq if isinstance(m, nn.BatchNorm1d)] == [4, 5]
    seq = lenet5(1, 10, 8, norm="batch").net
    assert [type(m) for m in seq] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, MultiplicativeNoise, nn.MaxPool2d,
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, MultiplicativeNoise, nn.MaxPool2d, nn.Flatten,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, MultiplicativeNoise,
        nn.Linear, nn.BatchNorm1d, nn.ReLU, MultiplicativeNoise, nn.Linear,
    ]
    assert [m.num_features for m in seq if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [6, 16, 120, 84]
    # build passes norm through; models without the option refuse it instead of ignoring it.
    assert any(isinstance(m, nn.BatchNorm1d) for m in build("mlp", (8,), 3, norm="batch").modules())
    assert check_model_norm("lenet5", "batch") == "batch"
    with pytest.raises(ValueError, match="applies to mlp and lenet5 only"):
        check_model_norm("vit", "batch")
    for bad in ("layer", None, "Batch"):
        with pytest.raises(ValueError, match="unknown norm"):
            mlp(4, 2, norm=bad)
        with pytest.raises(ValueError, match="unknown norm"):
            lenet5(norm=bad)


def test_builder_errors_are_clear():
    with pytest.raises(ValueError, match="gelu.*relu.*sigmoid.*tanh"):
        mlp(4, 2, activation="swish")
    with pytest.raises(ValueError, match="at least one hidden"):
        mlp(4, 2, hidden=())
    for depth in (7, 9, 21, 2, "20"):
        with pytest.raises(ValueError, match="6n \\+ 2"):
            resnet(depth)
    with pytest.raises(ValueError, match="too small"):
        lenet5(1, 10, 3)
    with pytest.raises(ValueError, match="too small"):
        lenet5(1, 10, 8, padding=0)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit(image_size=9, patch_size=2)
    with pytest.raises(ValueError, match="multiple of heads"):
        vit(dim=10, heads=4)
    with pytest.raises(ValueError, match="noise"):
        lenet5(noise="per-pixel")


def test_bayesianize_places_noise_and_leaves_the_input_alone():
    seq = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(),
        nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.0)),
        nn.Linear(5, 4),  # no activation follows: noise right after it
        nn.Linear(4, 3),  # output layer: no noise
    )
    types_before = [type(m) for m in seq.modules()]
    out = bayesianize(seq, low=-10.0, high=0.0, noise="global")
    assert [type(m) for m in out] == [
        nn.Linear, nn.ReLU, MultiplicativeNoise,
        nn.Linear, nn.BatchNorm1d, nn.Tanh, MultiplicativeNoise, nn.Dropout,
        nn.Linear, MultiplicativeNoise,
        nn.Linear,
    ]
    noises = [m for m in out if isinstance(m, MultiplicativeNoise)]
    assert [(m.num_structures, m.channel_dim, m.low, m.noise) for m in noises] == [
        (8, -1, -10.0, "global"), (5, -1, -10.0, "global"), (4, -1, -10.0, "global"),
    ]
    assert [type(m) for m in seq.modules()] == types_before
    assert out[0].weight is not seq[0].weight
    # With theta = 1 everywhere the noisy network computes the original function.
    seq.eval(), out.eval()
    for layer in noises:
        layer.set_posterior_mean(torch.ones(layer.num_structures))
    x = torch.randn(7, 6)
    with torch.no_grad(), noise_mode(out, "mean"):
        torch.testing.assert_close(out(x), seq(x))


def test_bayesianize_conv_noise_after_bn_and_activation():
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 1), nn.ReLU(), nn.Flatten(), nn.Linear(45, 2),
    )
    out = bayesianize(seq)
    assert [type(m) for m in out] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, MultiplicativeNoise, nn.MaxPool2d,
        nn.Conv2d, nn.ReLU, MultiplicativeNoise, nn.Flatten, nn.Linear,
    ]
    assert [(out[3].num_structures, out[3].channel_dim), (out[7].num_structures, out[7].channel_dim)] == [(4, 1), (5, 1)]
    classifier = bayesianize(seq, classifier=True)
    assert isinstance(classifier, NoisyClassifier) and classifier.num_classes == 2
    assert list(noise_modules(classifier)) == ["net.3.theta", "net.7.theta"]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return x + self.fc(x)


def test_bayesianize_rejects_what_it_cannot_handle():
    with pytest.raises(ValueError, match="nn.Sequential"):
        bayesianize(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="at least two"):
        bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="custom module"):
        bayesianize(nn.Sequential(nn.Linear(3, 3), _Residual(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="already bayesianized"):
        bayesianize(bayesianize(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))))


def test_build_from_data_shapes():
    assert set(MODELS) == {"mlp", "lenet5", "resnet", "vit"}
    x = torch.randn(2, 1, 8, 8)
    for name in MODELS:
        model = build(name, (1, 8, 8), 7)
        assert model(x).shape == (2, 7), name
        assert model.num_classes == 7
    assert build("mlp", (1, 8, 8), 3).net[1].in_features == 64
    assert build("mlp", (40,), 10, hidden=(5,)).net[1].in_features == 40
    assert build("resnet", (3, 8, 8), 10, depth=8, width=2).net.conv1.in_channels == 3
    assert build("vit", (2, 12, 8), 10, patch_size=4, dim=8, heads=2)(torch.randn(1, 2, 12, 8)).shape == (1, 10)
    with pytest.raises(ValueError, match="lenet5.*mlp.*resnet.*vit"):
        build("alexnet", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="\\(C, H, W\\)"):
        build("lenet5", (40,), 10)
    with pytest.raises(ValueError, match="in_channels"):
        build("resnet", (3, 8, 8), 10, in_channels=1)


def _randomise_batchnorm(model, g):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.normal_(generator=g)
            m.bias.data.normal_(generator=g)


def _expected_compact_params(name, kept):
    """Parameter count of the compacted network, by hand from the kept structures per site."""
    if name == "mlp":  # 64 -> k1 -> k2 -> 5, weights and biases
        k1, k2 = kept
        return 64 * k1 + k1 + k1 * k2 + k2 + k2 * NUM_CLASSES + NUM_CLASSES
    if name == "lenet5":  # 8x8 input, padding 2: the second pool leaves 2x2 maps
        k1, k2, k3, k4 = kept
        return (k1 * (25 * 1 + 1) + k2 * (25 * k1 + 1) + k3 * (k2 * 4 + 1) + k4 * (k3 + 1)
                + NUM_CLASSES * (k4 + 1))
    # resnet depth 8, width 4: stem 3->4, blocks 4->k->4, 4->k->8 (+1x1 shortcut), 8->k->16 (+1x1),
    # convs without bias, BatchNorm weight and bias per channel, fc 16 -> classes.
    total = 3 * 4 * 9 + 2 * 4
    for (c_in, c_out), k in zip([(4, 4), (4, 8), (8, 16)], kept):
        total += c_in * k * 9 + 2 * k + k * c_out * 9 + 2 * c_out
        if c_in != c_out:
            total += c_in * c_out + 2 * c_out
    return total + 16 * NUM_CLASSES + NUM_CLASSES


@pytest.mark.parametrize(
    "name, builder, shape",
    [
        ("mlp", lambda: mlp(64, NUM_CLASSES, hidden=(12, 7)), (1, 8, 8)),
        ("lenet5", lambda: lenet5(1, NUM_CLASSES, 8), (1, 8, 8)),
        ("resnet", lambda: resnet(8, NUM_CLASSES, 3, width=4), (3, 8, 8)),
    ],
    ids=["mlp", "lenet5", "resnet"],
)
def test_compact_matches_the_masked_model(name, builder, shape):
    from bmrs_pyro.compaction import compact

    g = torch.Generator().manual_seed(3)
    model = builder()
    _randomise_batchnorm(model, g)
    model.eval()
    kept = []
    for layer in noise_modules(model).values():
        layer.set_posterior_mean(0.5 + torch.rand(layer.num_structures, generator=g))
        mask = (torch.rand(layer.num_structures, generator=g) < 0.5).float()
        mask[0] = 1.0  # keep one structure per site: a fully pruned layer is a separate case
        layer.mask.copy_(mask)
        kept.append(int(mask.sum()))
    assert sum(kept) < sum(m.num_structures for m in noise_modules(model).values())
    x = torch.randn(6, *shape, generator=g)
    with torch.no_grad(), noise_mode(model, "mean"):
        masked = model.logits(x)
    small = compact(model, example_input=x)
    with torch.no_grad():
        out = small(x)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=0)
    assert not any(isinstance(m, MultiplicativeNoise) for m in small.modules())
    assert sum(p.numel() for p in small.parameters()) == _expected_compact_params(name, kept)
