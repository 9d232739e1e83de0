"""Models by name, built from a data set's input shape and number of classes (for the CLI)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from bmrs_pyro.nn import NoisyClassifier

from ._common import check_norm
from .lenet import lenet5
from .mlp import mlp
from .resnet import resnet
from .vit import vit

#: Name -> builder of every model in the zoo.
MODELS: dict[str, Callable[..., NoisyClassifier]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "resnet": resnet,
    "vit": vit,
}


#: Models that take ``norm`` (see :data:`NORMS`).
NORM_MODELS = ("mlp", "lenet5")


def check_model_norm(model: str, norm: object) -> str:
    """``norm`` checked for ``model``: one of :data:`~bmrs_pyro.models.NORMS`, and ``"none"`` for models without a
    ``norm`` option (resnet has its BatchNorms built in, vit its LayerNorms)."""
    if check_norm(norm) != "none" and model not in NORM_MODELS:
        raise ValueError(f"norm={norm!r} applies to {' and '.join(NORM_MODELS)} only, not to {model!r}")
    return norm  # type: ignore[return-value]


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"{name} needs image inputs of shape (C, H, W), got input_shape={input_shape}; "
            "use 'mlp' for feature vectors"
        )
    return input_shape  # type: ignore[return-value]


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> NoisyClassifier:
    """Build model ``name`` for inputs of ``input_shape`` ((C, H, W) or (D,)) and ``num_classes``.

    ``mlp`` takes any shape (it flattens; ``in_dim`` is the product); ``lenet5``, ``resnet`` and
    ``vit`` need (C, H, W) and take ``in_channels`` and the image size from it. Other keyword
    arguments go to the builder (e.g. ``hidden=(50,) * 6`` for mlp, ``depth=8`` for resnet).

    Raises:
        ValueError: an unknown name (the message lists :data:`MODELS`), a shape the model cannot
        take, or a keyword argument that ``build`` sets itself.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {tuple(input_shape)}")
    if name == "mlp":
        fixed = {"in_dim": math.prod(shape), "out_dim": num_classes}
    elif name == "lenet5":
        c, h, w = _image_shape(name, shape)
        fixed = {"in_channels": c, "num_classes": num_classes, "input_size": (h, w)}
    elif name == "resnet":
        c, _, _ = _image_shape(name, shape)
        fixed = {"in_channels": c, "num_classes": num_classes}
    else:
        c, h, w = _image_shape(name, shape)
        fixed = {"in_channels": c, "num_classes": num_classes, "image_size": (h, w)}
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"build sets {clash} from input_shape and num_classes; do not pass them")
    return MODELS[name](**fixed, **kwargs)
