"""Multi-label image classifier for the dev captions' attributes ("finding=polyp", "count=2", "location=upper-left").

A torchvision backbone (its classification head removed) + one linear layer giving one logit per label. Input:
float images [B, 3, H, W] in [-1, 1] (the project's pixel convention, harness/dataset.py); the model maps them to
the ImageNet normalisation torchvision's weights expect, so ImageNet-initialised and from-scratch models see the
same inputs. The label names and the training image size are part of the config, so a saved classifier says what
its outputs mean. `save_pretrained(dir)` / `from_pretrained(dir)` (config.json + model.safetensors, the diffusers
/ transformers layout) without diffusers' ModelMixin: importing that pulls in peft and transformers (~20 s on a
busy CPU), which every `harness score --metrics adherence` would pay for a ResNet. No training logic here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# torchvision constructor name -> (ImageNet weights file in the torch hub cache, feature width)
BACKBONES = {
    "resnet18": ("resnet18-f37072fd.pth", 512),
    "resnet34": ("resnet34-b627a593.pth", 512),
    "resnet50": ("resnet50-0676ba61.pth", 2048),
    "mobilenet_v3_small": ("mobilenet_v3_small-047dcff4.pth", 576),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """(torchvision network with its classifier replaced by Identity, feature width); randomly initialised."""
    import torchvision

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    net = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        net.fc = nn.Identity()
    else:  # mobilenet: keep the pooled features, drop the MLP head
        net.classifier = nn.Identity()
    return net, BACKBONES[name][1]


@dataclass(frozen=True)
class AttributeClassifierConfig:
    labels: tuple[str, ...] = field(default_factory=tuple)
    backbone: str = "resnet18"
    image_size: int = 128
    dropout: float = 0.0


class AttributeClassifier(nn.Module):
    def __init__(self, labels: tuple = (), backbone: str = "resnet18", image_size: int = 128, dropout: float = 0.0):
        super().__init__()
        if not labels:
            raise ValueError("an attribute classifier needs at least one label")
        self.config = AttributeClassifierConfig(tuple(labels), backbone, int(image_size), float(dropout))
        self.encoder, width = build_backbone(backbone)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, len(labels))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": type(self).__name__, **asdict(self.config), "labels": list(self.config.labels)}
        (d / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(d / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "AttributeClassifier":
        from safetensors.torch import load_file

        d = Path(directory)
        raw = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
        raw.pop("_class_name", None)
        unknown = set(raw) - set(AttributeClassifierConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)} in {d / CONFIG_NAME}")
        model = cls(**raw)
        model.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
        return model.eval()

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def load_backbone_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load torchvision's ImageNet weights into the backbone (the original classifier's tensors are dropped)."""
        own = self.encoder.state_dict()
        kept = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in kept]
        if missing:
            raise ValueError(f"backbone weights lack {len(missing)} tensor(s), e.g. {missing[0]}")
        self.encoder.load_state_dict(kept)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (pooled backbone) features [B, D] of images in [-1, 1]."""
        x = ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, L] of images [B, 3, H, W] in [-1, 1]."""
        return self.head(self.drop(self.features(x)))
