"""ModelSpec and the seeded builder shared by server and sites."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from models.classifier import Classifier
from models.dual import DualClassifier
from models.encoders import ENCODERS


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    hidden: int = 128
    norm: str = "batch"
    seed: int = 0
    #: privacy.fix_model: BatchNorm layers replaced by GroupNorm (Opacus' ModuleValidator.fix) so DP-SGD can train
    dp_fix: bool = False
    #: arch "lm" only (``models/lm.py``): transformer blocks and attention heads; input_shape is (context,),
    #: hidden the width d, num_classes the vocabulary (256 bytes)
    blocks: int = 4
    heads: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)


def _plain(spec: ModelSpec) -> nn.Module:
    if spec.arch == "lm":  # language: the byte-level causal transformer (WorldLM's small model)
        from models.lm import ByteLM

        return ByteLM(context=spec.input_shape[0], d=spec.hidden, blocks=spec.blocks, heads=spec.heads)
    enc = ENCODERS[spec.arch](spec.input_shape, spec.hidden, spec.norm)
    return Classifier(enc, spec.num_classes)


#: Model layouts a method can ask for (``MethodConfig.variant``).
VARIANTS: dict[str, Callable[[ModelSpec], nn.Module]] = {"plain": _plain}


def _dual(spec: ModelSpec) -> nn.Module:
    return DualClassifier(ENCODERS[spec.arch](spec.input_shape, spec.hidden, spec.norm), spec.num_classes)


VARIANTS["dual"] = _dual  # DualFed: encoder + shared_head + projector + personal_head


def _floral(spec: ModelSpec, **options) -> nn.Module:
    from models.lora import FloralModel

    return FloralModel(_plain(spec), **options)


def _floral_ensemble(spec: ModelSpec, num_copies: int = 4, **options) -> nn.Module:
    from models.lora import EnsembleModel

    return EnsembleModel(lambda: _plain(spec), num_copies, **options)


VARIANTS["floral"] = _floral  # FLoRAL: base.* + adaptors.<c>.* + router.theta
VARIANTS["floral_ensemble"] = _floral_ensemble  # FLoRAL's ensemble baseline: copies.<c>.* + router.theta


def _mfed(spec: ModelSpec, decoders: dict) -> nn.Module:
    from models.mfed import build

    return build(spec, decoders)


VARIANTS["mfed"] = _mfed  # M-Fed: encoder.* + decoders.<task group>.*


def build_model(spec: ModelSpec, variant: Any = "plain", init: bool = True) -> nn.Module:
    """Same spec and seed -> bit-identical initial tensors on every machine.

    ``variant`` is a variant name, or a method config whose ``variant`` names one and whose
    ``model_options()`` parameterize it (FLoRAL's adaptor count, rank budget and layers).
    ``init=False``: a skeleton on the meta device (names and shapes, no memory, no random init), for a
    model whose every tensor is about to be overwritten (:func:`fill`).
    """
    options = {} if isinstance(variant, str) else variant.model_options()
    variant = variant if isinstance(variant, str) else variant.variant
    if variant not in VARIANTS:
        raise KeyError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    if not init:
        with torch.device("meta"):
            return build_model(spec, variant if not options else _Variant(variant, options))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = VARIANTS[variant](spec, **options)
        if spec.dp_fix:
            from opacus.validators import ModuleValidator

            model = ModuleValidator.fix(model)
        return model
    finally:
        torch.random.set_rng_state(gen_state)


@dataclass(frozen=True)
class _Variant:
    """A variant name with its options, as a method config passes them (for the meta-device build)."""

    variant: str
    options: dict

    def model_options(self) -> dict:
        return dict(self.options)


def fill(skeleton: nn.Module, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> nn.Module | None:
    """``skeleton`` (``build_model(init=False)``) made real with every tensor taken from ``tensors``, or None when
    ``tensors`` do not cover all of them (the missing ones need their seeded initial values: build it seeded) or
    the model keeps state outside its state dict (a non-persistent buffer would stay uninitialized)."""
    names = set(skeleton.state_dict())
    held = {n for n, _ in skeleton.named_parameters()} | {n for n, _ in skeleton.named_buffers()}
    if not names <= set(tensors) or not held <= names:
        return None
    skeleton.to_empty(device=device)
    skeleton.load_state_dict({k: tensors[k] for k in names}, strict=True)
    return skeleton
