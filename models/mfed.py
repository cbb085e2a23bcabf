"""M-Fed's model: one shared encoder to a spatial feature map F, and one decoder per (task, architecture).

Every model Kumiki offers gives the encoder (``[model] arch``, ``norm``):

* ``cnn``: CNN-S's convolutions (``models.encoders.cnn_trunk``): F in R^{64 x H/4 x W/4};
* ``mlp``: Kumiki's MLP with its second layer sized to reshape into a map: Flatten,
  Linear(CHW, hidden), norm, ReLU, Linear(hidden, 16 H/4 W/4), ReLU, reshape: F in R^{16 x H/4 x W/4}.

Decoders read only F (``../shared/methods/mfed.md`` section 3), two architectures per kind:

* classification: ``mlp`` (default; flatten, Linear(|F|, hidden), ReLU, Linear(hidden, K): with the CNN
  this is exactly CNN-S's classifier path) or ``linear`` (flatten, Linear(|F|, K));
* dense tasks (segmentation, edges: 1 logit map; denoising: C channels through a sigmoid):
  ``convt`` (ConvT(c, 32, 2, s2)-norm-ReLU, ConvT(32, 16, 2, s2)-norm-ReLU, Conv(16, out, 1): the
  spec's segmentation decoder) or ``upsample`` (bilinear to H x W, Conv(c, 16, 3)-ReLU, Conv(16, out, 3):
  the spec's edge decoder). Defaults: segmentation and denoising ``convt``, edges ``upsample``.

The model holds a decoder for every (task, architecture) of the federation, so the server and every site
build the same seeded tensors; a site trains and sends only its own (``active``), the split makes each
decoder the group tensors of its ``task:`` group.
"""

from __future__ import annotations

import torch
from torch import nn

from models.encoders import _norm1d, _norm2d, cnn_trunk

#: channels of F for each encoder
MAP_CHANNELS = {"cnn": 64, "mlp": 16}


def encoder(arch: str, input_shape: tuple[int, int, int], hidden: int, norm: str) -> nn.Module:
    c, h, w = input_shape
    if arch == "cnn":
        return cnn_trunk(c, norm)
    if arch == "mlp":
        k = MAP_CHANNELS["mlp"]
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), _norm1d(norm, hidden), nn.ReLU(),
                             nn.Linear(hidden, k * (h // 4) * (w // 4)), nn.ReLU(), nn.Unflatten(1, (k, h // 4, w // 4)))
    raise ValueError(f"M-Fed has no encoder for model.arch = {arch!r}")


def classifier(kind: str, flat: int, hidden: int, classes: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, classes))
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(flat, classes))
    raise ValueError(f"no classification decoder {kind!r}")


def dense(kind: str, c: int, out: int, size: tuple[int, int], norm: str, sigmoid: bool) -> nn.Module:
    if kind == "convt":
        layers = [nn.ConvTranspose2d(c, 32, 2, stride=2), _norm2d(norm, 32), nn.ReLU(),
                  nn.ConvTranspose2d(32, 16, 2, stride=2), _norm2d(norm, 16), nn.ReLU(), nn.Conv2d(16, out, 1)]
    elif kind == "upsample":
        layers = [nn.Upsample(size=size, mode="bilinear", align_corners=False), nn.Conv2d(c, 16, 3, padding=1),
                  nn.ReLU(), nn.Conv2d(16, out, 3, padding=1)]
    else:
        raise ValueError(f"no dense decoder {kind!r}")
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))


def decoder(task: str, kind: str, arch: str, input_shape: tuple[int, int, int], hidden: int, classes: int,
            norm: str) -> nn.Module:
    c, h, w = input_shape
    k = MAP_CHANNELS[arch]
    if task == "classification":
        return classifier(kind, k * (h // 4) * (w // 4), hidden, classes)
    if h % 4 or w % 4:
        raise ValueError(f"M-Fed's {task} decoders rebuild the image from a map at 1/4 of its size: the height and "
                         f"width must be multiples of 4, got {h} x {w} (data.input_shape)")
    return dense(kind, k, c if task == "denoising" else 1, (h, w), norm, sigmoid=task == "denoising")


class MFedModel(nn.Module):
    """``encoder.*`` (shared) and ``decoders.<key>.*`` (one per task group); ``forward`` uses the ``active`` one."""

    def __init__(self, encoder: nn.Module, decoders: dict[str, nn.Module]):
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.active = next(iter(decoders))

    def use(self, key: str) -> MFedModel:
        if key not in self.decoders:
            raise KeyError(f"this model has no decoder {key!r} (it has {', '.join(self.decoders)})")
        self.active = key
        return self

    @property
    def decoder(self) -> nn.Module:
        return self.decoders[self.active]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def build(spec, decoders: dict[str, tuple[str, str]]) -> MFedModel:
    """``decoders``: module key -> (task, architecture), built in this order (the seeded draw depends on it)."""
    enc = encoder(spec.arch, spec.input_shape, spec.hidden, spec.norm)
    return MFedModel(enc, {key: decoder(task, kind, spec.arch, spec.input_shape, spec.hidden, spec.num_classes,
                                        spec.norm)
                           for key, (task, kind) in decoders.items()})
