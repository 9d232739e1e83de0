import pyro
import pytest
import torch


class NoisyMLP(pyro.nn.PyroModule):
    """A minimal multiplicative-noise MLP written the way a user would write it."""

    def __init__(self, sizes=(64, 100, 100, 10), noise="example"):
        super().__init__()
        from bmrs_pyro.nn import MultiplicativeNoise

        self.sizes = sizes
        layers, noises = [], []
        for i in range(len(sizes) - 2):
            layers.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            noises.append(MultiplicativeNoise(sizes[i + 1], noise=noise))
        self.hidden = torch.nn.ModuleList(layers)
        self.noise = pyro.nn.PyroModule[torch.nn.ModuleList](noises)
        self.out = torch.nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x, y=None):
        h = x.flatten(1)
        for fc, noise in zip(self.hidden, self.noise):
            h = noise(torch.tanh(fc(h)))
        logits = self.out(h)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", pyro.distributions.Categorical(logits=logits), obs=y)
        return logits


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def noisy_mlp():
    return NoisyMLP


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return (xtr, ytr), (xte, yte)
