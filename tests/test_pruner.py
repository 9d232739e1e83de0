"""Pruning criteria and reduce (issue 3, points 2 and 3): decisions, rankings, masks, errors."""

import json
import math


import pytest
import torch
from scipy import integrate, stats
from torch import nn

from bmrs_pyro.criteria import CRITERIA, Criterion, register_criterion
from bmrs_pyro.guides import AutoTruncatedLogNormal
from bmrs_pyro.infer import fit, minibatch_loss
from bmrs_pyro.nn import MultiplicativeNoise, NoisyClassifier, noise_modules
from bmrs_pyro.pruner import ReductionResult, reduce
from bmrs_pyro.reduction import bits_to_log_bound, delta_f_log_normal, delta_f_log_uniform

A, B = -20.0, 0.0


def small_model(widths=(6, 5), n_in=4, n_out=3, act=nn.Tanh):
    layers, prev = [], n_in
    for w in widths:
        layers += [nn.Linear(prev, w), act(), MultiplicativeNoise(w)]
        prev = w
    layers.append(nn.Linear(prev, n_out))
    model = NoisyClassifier(nn.Sequential(*layers))
    guide = AutoTruncatedLogNormal(model)
    x, y = torch.randn(8, n_in), torch.randint(0, n_out, (8,))
    guide(x, y)  # creates the variational parameters
    return model, guide, (x, y)


def deep_getattr(obj, key):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def raw(guide, site):
    """The unconstrained loc and log-scale tensors of a site (what the optimiser updates)."""
    *path, leaf = site.split(".")
    out = []
    for store in (guide.locs, guide.log_scales):
        module = deep_getattr(store, ".".join(path)) if path else store
        out.append(getattr(module, leaf + "_unconstrained"))
    return out


def set_posterior(guide, site, loc, log_scale):
    loc_p, ls_p = raw(guide, site)
    with torch.no_grad():
        loc_p.copy_(torch.as_tensor(loc, dtype=loc_p.dtype))
        ls_p.copy_(torch.as_tensor(log_scale, dtype=ls_p.dtype).expand_as(ls_p))


def bayes_net_and_guide(width, x, y):
    """A net with Bayesian first-layer weights and ``width`` noise units, and its
    AutoGuideList (AutoNormal for the weights, AutoTruncatedLogNormal second), run once on x, y."""
    import pyro
    from pyro.infer.autoguide import AutoGuideList, AutoNormal

    from bmrs_pyro.guides import hide_noise_sites

    class BayesNet(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = pyro.nn.PyroModule[nn.Linear](4, width)
            self.fc.weight = pyro.nn.PyroSample(pyro.distributions.Normal(0.0, 1.0).expand([width, 4]).to_event(2))
            self.noise = MultiplicativeNoise(width)
            self.out = nn.Linear(width, 2)

        def forward(self, x, y=None):
            logits = self.out(self.noise(torch.tanh(self.fc(x))))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)

    pyro.clear_param_store()
    model = BayesNet()
    guide = AutoGuideList(model)
    guide.append(AutoNormal(hide_noise_sites(model)))
    guide.append(AutoTruncatedLogNormal(model))
    guide(x, y)
    return model, guide


@pytest.fixture
def fitted():
    """Two noise layers; the first has posteriors at the low end (prunable) and at the top."""
    model, guide, data = small_model()
    s0, s1 = list(noise_modules(model))
    # at a with scale 0.5 / 1 (BMRS must prune), at b with tiny scale (must keep), in between
    set_posterior(guide, s0, [-20.0, -19.0, 0.0, -0.5, -12.0, -17.0], [math.log(0.5), 0.0, -5.0, -4.0, 0.5, 1.0])
    set_posterior(guide, s1, [-0.1, -20.5, -3.0, -6.0, -10.0], [-5.0, -1.0, -3.0, 0.0, 1.5])
    return model, guide, data, (s0, s1)


# ---------------------------------------------------------------- BMRS decisions


@pytest.mark.parametrize("method", ["bmrs_n", "bmrs_u"])
@pytest.mark.parametrize("margin", [None, 0.0, 0.5, 0.9189385332046727, 1.0, 3.0])
def test_bmrs_prunes_exactly_where_df_reaches_minus_margin(fitted, method, margin):
    """keep == (dF < -margin), dF computed by the reduction functions directly; default margin 1."""
    model, guide, _, (s0, s1) = fitted
    options = {} if margin is None else {"margin": margin}
    result = reduce(model, guide, method, **options)
    m = 1.0 if margin is None else margin
    assert result.margin == m and result.options["margin"] == m
    for site in (s0, s1):
        loc, scale = guide.loc_scale(site)
        if method == "bmrs_n":
            df = delta_f_log_normal(loc.detach(), scale.detach(), A, B)
        else:
            df = delta_f_log_uniform(loc.detach(), scale.detach(), A, B, reduced_high=bits_to_log_bound(8))
        assert torch.equal(result.scores[site], df)  # the scores stay the exact dF whatever the margin
        assert torch.equal(result.keep[site], df < -m)
    if method == "bmrs_n" and margin == 0.0:
        # the posteriors piled up at a are pruned, the ones sharply at b kept (known answers)
        assert result.keep[s0].tolist()[:4] == [False, False, True, True]
        assert result.keep[s1].tolist()[:2] == [True, False]
        assert 0 < result.fraction_removed < 1


def test_margin_moves_structures_of_the_tie_band_only(fitted):
    """A posterior close to the prior (dF in (-1, 0)) is kept by the strict rule, removed by the
    default margin; a clearly needed one (dF << -1) is kept by both; the band is counted."""
    model, guide, _, (s0, s1) = fitted
    set_posterior(guide, s0, [-10.0, -10.0, 0.0, -0.5, -12.0, -17.0], [5.0, 2.0, -5.0, -4.0, 0.5, 1.0])
    strict = reduce(model, guide, "bmrs_n", margin=0)
    default = reduce(model, guide, "bmrs_n")
    df = strict.scores[s0]
    assert -1 < df[0] < 0 and -1 < df[1] < 0  # near-prior posteriors: near ties
    assert strict.keep[s0][:2].all() and not default.keep[s0][:2].any()
    assert default.keep[s0][2:4].all() and strict.keep[s0][2:4].all()
    band = default.tie_band()
    in_band = sum(int(((strict.scores[s] >= -1) & (strict.scores[s] < 0)).sum()) for s in (s0, s1))
    assert band["count"] == in_band >= 2 and band["removed"] == band["count"] and band["band"] == [-1.0, 0.0]
    assert strict.tie_band()["count"] == 0


def test_reference_code_is_the_published_rule_and_margin_zero_the_strict_one(fitted):
    """Today's two behaviours: the authors' dF (exact + 0.5 log 2pi) >= 0, and the exact dF >= 0."""
    model, guide, _, sites = fitted
    set_posterior(guide, sites[0], [-10.0, -16.0, 0.0, -0.5, -12.0, -17.0], [5.0, 0.7, -5.0, -4.0, 0.5, 1.0])
    offset = 0.5 * math.log(2 * math.pi)
    ref = reduce(model, guide, "bmrs_n", reference_code=True)
    strict = reduce(model, guide, "bmrs_n", margin=0.0)
    for site in sites:
        loc, scale = guide.loc_scale(site)
        authors = delta_f_log_normal(loc.detach(), scale.detach(), A, B) + offset
        assert torch.equal(ref.keep[site], ~(authors >= 0))
        assert torch.equal(strict.keep[site], ~(authors - offset >= 0))
        assert torch.equal(ref.scores[site], strict.scores[site])  # scores stay exact
    assert ref.margin == pytest.approx(offset, abs=1e-15)
    assert not torch.equal(ref.keep[sites[0]], strict.keep[sites[0]])  # the fixture has a tie in between
    assert "authors" in ref.rule and "authors" in str(ref)
    with pytest.raises(ValueError, match="reference_code"):
        reduce(model, guide, "bmrs_n", reference_code=True, margin=1.0)


@pytest.mark.parametrize("margin", [-0.5, float("nan"), float("inf"), "1", True])
def test_bad_margin_is_refused(fitted, margin):
    model, guide, _, _ = fitted
    with pytest.raises(ValueError, match="margin"):
        reduce(model, guide, "bmrs_n", margin=margin)


def test_method_none_keeps_everything_and_cannot_rank(fitted):
    model, guide, _, sites = fitted
    result = reduce(model, guide, "none")
    assert result.fraction_removed == 0 and all(k.all() for k in result.keep.values())
    assert torch.equal(result.scores[sites[0]], reduce(model, guide, "bmrs_n").scores[sites[0]])
    with pytest.raises(ValueError, match="none"):
        reduce(model, guide, "none", fraction=0.5)


@pytest.mark.parametrize("margin", [0.0, 1.0])
def test_bmrs_n_decision_matches_quadrature(fitted, margin):
    """dF >= -margin decided independently: integrate q(z) p~(z) / p(z) with scipy."""
    model, guide, _, (s0, _) = fitted
    keep = reduce(model, guide, "bmrs_n", reduced_scale=0.5, margin=margin).keep[s0]  # wide p~: quadrature resolves it
    loc, scale = (t.detach().double().numpy() for t in guide.loc_scale(s0))
    for i, (m, s) in enumerate(zip(loc, scale)):
        q = stats.truncnorm((A - m) / s, (B - m) / s, loc=m, scale=s)
        p_red = stats.truncnorm((A - A) / 0.5, (B - A) / 0.5, loc=A, scale=0.5)
        val, _ = integrate.quad(lambda z: q.pdf(z) * p_red.pdf(z) * (B - A), A, B, points=[m], limit=200)
        assert keep[i].item() == (val < math.exp(-margin)), (i, m, s, val)


@pytest.mark.parametrize("bits", [8, 4])
def test_bmrs_u_matches_mass_below_bound(fitted, bits):
    """BMRS_U prunes iff q puts at least the prior's mass in [a, log 2^-bits] (scipy truncnorm)."""
    model, guide, _, sites = fitted
    result = reduce(model, guide, "bmrs_u", bits=bits, margin=0)
    bound = -bits * math.log(2)
    for site in sites:
        loc, scale = guide.loc_scale(site)
        df = delta_f_log_uniform(loc.detach(), scale.detach(), A, B, reduced_high=bits_to_log_bound(bits))
        assert torch.equal(result.keep[site], df < 0)
        for i, (m, s) in enumerate(zip(loc.tolist(), scale.tolist())):
            mass = stats.truncnorm((A - m) / s, (B - m) / s, loc=m, scale=s).cdf(bound)
            prior_mass = (bound - A) / (B - A)
            if abs(mass - prior_mass) > 1e-9:
                assert result.keep[site][i].item() == (mass < prior_mass)


def test_bmrs_u_reduced_low_at_authors_bound_never_prunes_a_posterior_at_low(fitted):
    model, guide, _, (s0, _) = fitted
    set_posterior(guide, s0, [-20.0] * 6, [-4.0] * 6)
    assert not reduce(model, guide, "bmrs_u").keep[s0].any()
    authors = reduce(model, guide, "bmrs_u", reduced_low=bits_to_log_bound(23))
    assert authors.keep[s0].all()
    assert authors.options["reduced_low"] == bits_to_log_bound(23)


def test_bmrs_with_fraction_ranks_by_minus_df(fitted):
    model, guide, _, sites = fitted
    result = reduce(model, guide, "bmrs_n", fraction=0.5, min_keep=0)
    df = torch.cat([result.scores[s] for s in sites])
    keep = torch.cat([result.keep[s] for s in sites])
    removed = torch.sort(df, descending=True).indices[:5]  # floor(0.5 * 11) = 5 largest dF
    assert set(torch.nonzero(~keep).flatten().tolist()) == set(removed.tolist())


# ---------------------------------------------------------------- SNR and E[theta]


def _moments_by_quadrature(m, s):
    """E[theta'] and E[theta'^2] of theta' = theta e^-c (c: loc clipped to [a, b]; SNR is scale-free)."""
    q = stats.truncnorm((A - m) / s, (B - m) / s, loc=m, scale=s)
    c = min(max(m, A), B)
    kw = dict(points=[c], limit=200, epsabs=0, epsrel=1e-11)
    e1 = integrate.quad(lambda z: math.exp(z - c) * q.pdf(z), A, B, **kw)[0]
    e2 = integrate.quad(lambda z: math.exp(2 * (z - c)) * q.pdf(z), A, B, **kw)[0]
    return e1, e2


def test_snr_rule_is_snr_below_one(fitted):
    model, guide, _, sites = fitted
    result = reduce(model, guide, "snr")
    decided = 0
    for site in sites:
        loc, scale = guide.loc_scale(site)
        for i, (m, s) in enumerate(zip(loc.tolist(), scale.tolist())):
            e1, e2 = _moments_by_quadrature(m, s)
            snr = e1 / math.sqrt(max(e2 - e1 * e1, 1e-300))
            assert result.scores[site][i].item() == pytest.approx(snr, rel=1e-4)
            assert result.keep[site][i].item() == (snr >= 1)
            decided += snr < 1
    assert 0 < decided < 11  # both outcomes occur


def test_e_theta_global_ranking_removes_the_lowest(fitted):
    model, guide, _, (s0, s1) = fitted
    # E[theta] ~ exp(loc) for tiny scales: a known global order
    set_posterior(guide, s0, [-1.0, -7.0, -3.0, -0.2, -9.0, -4.0], -8.0)
    set_posterior(guide, s1, [-2.0, -8.0, -0.5, -5.0, -6.0], -8.0)
    result = reduce(model, guide, "e_theta", fraction=0.4)  # floor(4.4) = 4 lowest overall
    assert result.options["scope"] == "global"
    assert result.keep[s0].tolist() == [True, False, True, True, False, True]
    assert result.keep[s1].tolist() == [True, False, True, True, False]
    assert result.scores[s0][0].item() == pytest.approx(math.exp(-1 + math.exp(-16) / 2), rel=1e-6)
    assert result.fraction_removed == pytest.approx(4 / 11)


def test_layer_scope_and_min_keep(fitted):
    model, guide, _, (s0, s1) = fitted
    set_posterior(guide, s0, [-10.0, -11.0, -12.0, -13.0, -14.0, -15.0], -8.0)  # all below layer 1
    set_posterior(guide, s1, [-1.0, -2.0, -3.0, -4.0, -5.0], -8.0)
    glob = reduce(model, guide, "e_theta", fraction=0.9)  # floor(9.9) = 9, but one per layer stays
    assert glob.keep[s0].tolist() == [True, False, False, False, False, False]
    assert glob.keep[s1].tolist() == [True, False, False, False, False]
    assert glob.kept_per_layer == {s0: (1, 6), s1: (1, 5)}
    layer = reduce(model, guide, "e_theta", fraction=0.5, scope="layer")  # 3 of 6, 2 of 5
    assert layer.keep[s0].tolist() == [True, True, True, False, False, False]
    assert layer.keep[s1].tolist() == [True, True, True, False, False]
    everything = reduce(model, guide, "e_theta", fraction=1.0)
    assert everything.kept_per_layer == {s0: (1, 6), s1: (1, 5)}
    gone = reduce(model, guide, "e_theta", fraction=1.0, min_keep=0)
    assert gone.fraction_removed == 1.0


def test_rule_removes_a_whole_layer_only_when_it_says_so(fitted):
    model, guide, _, (s0, s1) = fitted
    set_posterior(guide, s0, [-20.0] * 6, 0.0)
    assert reduce(model, guide, "bmrs_n").kept_per_layer[s0] == (0, 6)
    kept = reduce(model, guide, "bmrs_n", min_keep=2)
    assert kept.kept_per_layer[s0] == (2, 6)


# ---------------------------------------------------------------- L2 and activation


def test_l2_uses_the_layer_feeding_the_noise_even_when_registered_elsewhere(noisy_mlp):
    """conftest's NoisyMLP registers both Linear layers before both noise layers."""
    model = noisy_mlp((4, 6, 6, 3))
    guide = AutoTruncatedLogNormal(model)
    guide(torch.randn(5, 4), torch.randint(0, 3, (5,)))
    norms0 = torch.tensor([3.0, 1.0, 6.0, 2.0, 5.0, 4.0])
    norms1 = torch.tensor([1.0, 6.0, 5.0, 2.0, 4.0, 3.0])
    with torch.no_grad():
        for fc, norms in ((model.hidden[0], norms0), (model.hidden[1], norms1)):
            w = torch.randn_like(fc.weight)
            fc.weight.copy_(w / w.norm(dim=1, keepdim=True) * norms[:, None])
            fc.bias.fill_(100.0)  # the bias is not part of the score
    result = reduce(model, guide, "l2", fraction=0.5)
    sites = list(noise_modules(model))
    assert result.options["scope"] == "layer"
    assert torch.allclose(result.scores[sites[0]], norms0.double(), atol=1e-5)
    assert torch.allclose(result.scores[sites[1]], norms1.double(), atol=1e-5)
    assert result.keep[sites[0]].tolist() == [False, False, True, False, True, True]
    assert result.keep[sites[1]].tolist() == [False, True, True, False, True, False]


def test_l2_of_conv_filters_and_missing_producer():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), MultiplicativeNoise(4, channel_dim=1),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = NoisyClassifier(net)
    guide = AutoTruncatedLogNormal(model)
    guide(torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,)))
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(4.0)[:, None, None, None] + 1 + torch.zeros(4, 2, 3, 3))
    scores = reduce(model, guide, "l2", fraction=0.25).scores["net.2.theta"]
    expected = (torch.arange(4.0) + 1) * math.sqrt(2 * 3 * 3)
    assert torch.allclose(scores, expected.double())

    bare = NoisyClassifier(nn.Sequential(MultiplicativeNoise(4), nn.Linear(4, 3)))
    g = AutoTruncatedLogNormal(bare)
    g(torch.randn(3, 4), torch.randint(0, 3, (3,)))
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        reduce(bare, g, "l2", fraction=0.5)


def test_activation_is_mean_absolute_output_after_noise():
    model, guide, _ = small_model(widths=(4,), n_in=3, act=nn.ReLU)
    net = model.net
    c = torch.tensor([2.0, -5.0, 0.5, 3.0])  # ReLU kills unit 1: activation 0
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].weight[:, 0] = c
        net[0].bias.zero_()
    site = list(noise_modules(model))[0]
    set_posterior(guide, site, [-1.0] * 4, math.log(0.01))
    x = torch.zeros(10, 3)
    x[:, 0] = torch.linspace(0.0, 1.0, 10)
    result = reduce(model, guide, "activation", fraction=0.5, data=(x, torch.zeros(10, dtype=torch.long)))
    e_theta = math.exp(-1 + 0.5 * 0.01**2)
    expected = torch.clamp(c, min=0).double() * x[:, 0].mean().item() * e_theta
    assert torch.allclose(result.scores[site], expected, rtol=1e-5)
    assert result.keep[site].tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="needs data"):
        reduce(model, guide, "activation", fraction=0.5)


# ---------------------------------------------------------------- masks, printing, errors


def test_apply_sets_masks_and_respect_mask(fitted):
    model, guide, _, (s0, s1) = fitted
    layers = noise_modules(model)
    result = reduce(model, guide, "bmrs_n").apply()
    for site in (s0, s1):
        assert torch.equal(layers[site].mask, result.keep[site].float())
    # structure 2 of s0 is sharply at b (BMRS keeps it); once masked it stays pruned
    layers[s0].mask.fill_(1.0)
    layers[s1].mask.fill_(1.0)
    layers[s0].mask[2] = 0.0
    assert not reduce(model, guide, "bmrs_n").keep[s0][2]
    assert reduce(model, guide, "bmrs_n", respect_mask=False).keep[s0][2]
    # with a fraction, already-masked structures count towards it first
    ranked = reduce(model, guide, "e_theta", fraction=1 / 11)
    assert ranked.fraction_removed == pytest.approx(1 / 11)
    assert not ranked.keep[s0][2] and ranked.keep[s0].sum() == 5 and ranked.keep[s1].all()


def test_printing_and_to_dict(fitted):
    model, guide, _, sites = fitted
    result = reduce(model, guide, "bmrs_n")
    text = str(result)
    assert repr(result) == text
    assert "dF" in text and "bmrs_n" in text
    assert "rule: prune where dF >= -1 nat" in text
    for site in sites:
        kept, total = result.kept_per_layer[site]
        line = next(ln for ln in text.splitlines() if ln.startswith(site))
        assert f"{kept}/{total}" in line
        assert f"{float(result.scores[site].min()):.4g}" in line
    d = json.loads(json.dumps(result.to_dict()))
    assert d["method"] == "bmrs_n" and d["options"]["margin"] == 1.0 and d["rule"] == result.rule
    assert d["layers"][sites[0]]["keep"] == result.keep[sites[0]].tolist()
    assert isinstance(result, ReductionResult)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "magic"}, "unknown pruning method 'magic'.*bmrs_n"),
        ({"method": "bmrs_n", "bits": 4}, "unknown option.*reduced_loc"),
        ({"method": "e_theta"}, "pass fraction"),
        ({"method": "e_theta", "fraction": 1.5}, "fraction must be"),
        ({"method": "e_theta", "fraction": 0.5, "scope": "world"}, "scope must be"),
        ({"method": "e_theta", "fraction": 0.5, "min_keep": -1}, "min_keep"),
        ({"method": "bmrs_u", "bits": 0}, "bits"),
        ({"method": "bmrs_u", "reduced_low": 5.0}, "reduced_low"),
    ],
)
def test_errors(fitted, kwargs, match):
    model, guide, _, _ = fitted
    with pytest.raises(ValueError, match=match):
        reduce(model, guide, **kwargs)


def test_guide_that_has_not_run():
    model = NoisyClassifier(nn.Sequential(nn.Linear(3, 4), MultiplicativeNoise(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="has not run"):
        reduce(model, AutoTruncatedLogNormal(model), "bmrs_n")


def test_registry_accepts_a_new_criterion(fitted):
    model, guide, _, (s0, s1) = fitted

    def neg_loc(model, guide, site, layer, *, data=None, shift=0.0):
        """-loc + shift: a toy criterion for the test."""
        return -guide.loc_scale(site)[0].detach() + shift

    crit = Criterion("neg_loc_test", neg_loc, rule=lambda s: s < 10, options={"shift": 0.0}, label="-loc")
    register_criterion(crit)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_criterion(crit)
        result = reduce(model, guide, "neg_loc_test", shift=1.0)
        assert result.keep[s0].tolist() == [False, False, True, True, False, False]
        assert "neg_loc_test" in CRITERIA and crit.doc.startswith("-loc")
    finally:
        CRITERIA.pop("neg_loc_test")
    for name in ("bmrs_n", "bmrs_u", "snr", "e_theta", "l2", "activation"):
        assert CRITERIA[name].doc  # every built-in criterion documents its source


# ---------------------------------------------------------------- continuous pruning


def test_continuous_pruning_freezes_pruned_structures_and_drops_their_kl():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model, guide, _ = small_model(widths=(6, 5), n_in=4, n_out=2)
    s0, s1 = list(noise_modules(model))
    # structures 0 and 1 of the first layer start piled up at low: the first reduction prunes them
    set_posterior(guide, s0, [-20.0, -20.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -5.0, -5.0, -5.0, -5.0])
    snapshots = []

    def record(epoch, history, model, guide):
        snapshots.append([p.detach().clone() for p in raw(guide, s0)])

    history = fit(model, guide, (x, y), epochs=4, batch_size=16, lr=0.05, prune_every=1,
                  callbacks=[record], progress=False)
    events = [e for e in history.events if e["event"] == "prune"]
    assert len(events) == 4 and events[0]["method"] == "bmrs_n"
    assert events[0]["kept"][s0] <= 4 and events[0]["fraction_removed"] > 0
    mask = noise_modules(model)[s0].mask
    assert mask[:2].tolist() == [0.0, 0.0]
    # the pruned structures' variational parameters never move again; the kept ones do
    for later in snapshots[1:]:
        for before, after in zip(snapshots[0], later):
            assert torch.equal(before[:2], after[:2])
    assert not torch.equal(snapshots[0][0][2:], snapshots[-1][0][2:])
    # the loss has no gradient (no likelihood, no KL) with respect to a pruned structure
    loc_p, ls_p = raw(guide, s0)
    loss = minibatch_loss(model, guide, x, y, dataset_size=64)
    g_loc, g_ls = torch.autograd.grad(loss, [loc_p, ls_p])
    assert torch.all(g_loc[:2] == 0) and torch.all(g_ls[:2] == 0)
    assert torch.all(g_ls[2:] != 0)


def test_continuous_pruning_freezes_pruned_structures_inside_an_autoguidelist():
    """The same guarantee when the noise guide is one part of an AutoGuideList (Bayesian weights)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model, guide = bayes_net_and_guide(5, x[:2], y[:2])
    set_posterior(guide[1], "noise.theta", [-20.0, -20.0, 0.0, 0.0, 0.0], [0.0, 0.0, -5.0, -5.0, -5.0])
    snapshots = []

    def record(epoch, history, model, guide):
        snapshots.append([p.detach().clone() for p in raw(guide[1], "noise.theta")])

    fit(model, guide, (x, y), epochs=3, batch_size=16, lr=0.05, prune_every=1, callbacks=[record], progress=False)
    assert model.noise.mask[:2].tolist() == [0.0, 0.0]
    for later in snapshots[1:]:
        for before, after in zip(snapshots[0], later):
            assert torch.equal(before[:2], after[:2])
    assert not torch.equal(snapshots[0][0][2:], snapshots[-1][0][2:])


def test_masked_kl_is_gone_from_the_loss_value():
    """Moving a masked structure's posterior anywhere leaves the (seeded) loss unchanged."""
    model, guide, (x, y) = small_model()
    s0 = list(noise_modules(model))[0]
    layer = noise_modules(model)[s0]
    layer.mask[3] = 0.0
    losses = []
    for loc3 in (0.0, -15.0):
        loc = torch.zeros(6)
        loc[3] = loc3
        set_posterior(guide, s0, loc, -3.0)
        torch.manual_seed(1)
        losses.append(minibatch_loss(model, guide, x, y, dataset_size=100).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    layer.mask[3] = 1.0
    torch.manual_seed(1)
    assert minibatch_loss(model, guide, x, y, dataset_size=100).item() != pytest.approx(losses[1], rel=1e-3)


def test_reduce_finds_the_noise_guide_inside_an_autoguidelist():
    model, guide = bayes_net_and_guide(3, torch.randn(5, 4), torch.randint(0, 2, (5,)))
    set_posterior(guide[1], "noise.theta", [-20.0, 0.0, 0.0], [0.0, -5.0, -5.0])
    result = reduce(model, guide, "bmrs_n")
    assert result.keep["noise.theta"].tolist() == [False, True, True]
    with pytest.raises(ValueError, match="AutoTruncatedLogNormal"):
        reduce(model, guide[0], "bmrs_n")


def test_find_noise_guide_looks_into_nested_guide_lists():
    from pyro.infer.autoguide import AutoGuideList, AutoNormal

    from bmrs_pyro.guides import find_noise_guide, hide_noise_sites

    model, _, _ = small_model()
    inner = AutoGuideList(model)
    noise_part = AutoTruncatedLogNormal(model)
    inner.append(noise_part)
    outer = AutoGuideList(model)
    outer.append(AutoNormal(hide_noise_sites(model)))
    outer.append(inner)
    assert find_noise_guide(outer) is noise_part and find_noise_guide(noise_part) is noise_part
    assert find_noise_guide(outer[0]) is None and find_noise_guide(object()) is None


@pytest.mark.parametrize("method, options, message", [
    ("magic", {}, "unknown pruning method"),
    ("bmrs_u", {"bits": 0}, "bits"),
    ("bmrs_n", {"margin": -1.0}, "margin"),
    ("bmrs_n", {"colour": 1}, "unknown option"),
    ("l2", {}, "needs prune_options"),
])
def test_continuous_pruning_options_are_checked_before_the_first_step(method, options, message):
    model, guide, data = small_model()
    steps = []

    def never(epoch, history, model, guide):
        steps.append(epoch)

    with pytest.raises(ValueError, match=message):
        fit(model, guide, data, epochs=3, prune_every=1, prune_method=method, prune_options=options,
            callbacks=[never], progress=False)
    assert steps == []  # refused before training, not at the first reduction


def test_prune_start_is_the_first_reduction_then_every_k():
    model, guide, data = small_model()
    history = fit(model, guide, data, epochs=12, prune_every=3, prune_start=5, progress=False)
    assert [e["epoch"] + 1 for e in history.events if e["event"] == "prune"] == [5, 8, 11]
    model, guide, data = small_model()
    history = fit(model, guide, data, epochs=12, prune_every=4, progress=False)  # default: a quarter
    assert [e["epoch"] + 1 for e in history.events if e["event"] == "prune"] == [3, 7, 11]
    with pytest.raises(ValueError, match="prune_start"):
        fit(model, guide, data, epochs=2, prune_every=1, prune_start=0, progress=False)
