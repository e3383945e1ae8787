"""The family table: for each torchvision architecture family, where its classification head is
and how its modules split into ordered layer groups (stem -> stages -> head).

This is the only module that knows architecture names. Group specs are lists of dotted paths to
submodules or parameters; a path may be listed in at most one group, and together the groups
(plus the head group, added automatically) must cover every parameter exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

GroupSpec = List[Tuple[str, List[str]]]
# Where LoRA goes (strategy.lora): dotted names of the layers peft wraps, and of parameters it adapts
# in place where the model reads a weight without calling its layer. The head is left out later.
LoraSpec = Tuple[List[str], List[str]]


def _lora_layers(m: nn.Module) -> LoraSpec:
    """Convolutional networks: every convolution and linear layer, but grouped (depthwise)
    convolutions, whose LoRA update peft cannot merge back into the weights."""
    return [n for n, mod in m.named_modules()
            if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)], []


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # regex matched against the torchvision model name
    head: str  # dotted path of the final classifier layer
    groups: Callable[[nn.Module], GroupSpec]  # ordered groups below the head
    aux_heads: Tuple[str, ...] = ()  # final layers of auxiliary classifiers (replaced too)
    aux_modules: Tuple[str, ...] = ()  # whole auxiliary classifiers (trained with the head)
    accepts_aux_logits: bool = False  # the builder takes an ``aux_logits`` keyword
    min_input: int = 32  # smallest input side the architecture accepts
    input_size_kwarg: bool = False  # the builder takes ``image_size`` (positional embeddings)
    random_init_kwargs: Dict[str, object] = field(default_factory=dict)
    lora: Callable[[nn.Module], LoraSpec] = _lora_layers  # where LoRA goes (strategy.lora)


def _children(model: nn.Module, path: str) -> List[str]:
    module = model.get_submodule(path)
    return [f"{path}.{name}" for name, _ in module.named_children()]


def _split_at(paths: Sequence[str], starts: Sequence[int]) -> List[List[str]]:
    """Split ``paths`` into consecutive chunks starting at the given indices."""
    bounds = list(starts) + [len(paths)]
    return [list(paths[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _downsamples(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
            if max(stride) > 1:
                return True
    return False


def _stages_by_stride(model: nn.Module, paths: Sequence[str]) -> List[List[str]]:
    """Chunk a run of blocks into stages, a new stage starting at each block that downsamples."""
    starts = [0] + [
        i for i, p in enumerate(paths) if i > 0 and _downsamples(model.get_submodule(p))
    ]
    return _split_at(paths, starts)


def _named(prefix: str, chunks: List[List[str]]) -> GroupSpec:
    return [(f"{prefix}{i + 1}", chunk) for i, chunk in enumerate(chunks)]


def _even_chunks(paths: Sequence[str], n: int) -> List[List[str]]:
    n = max(1, min(n, len(paths)))
    size, rest = divmod(len(paths), n)
    starts, pos = [], 0
    for i in range(n):
        starts.append(pos)
        pos += size + (1 if i < rest else 0)
    return _split_at(paths, starts)


# --- group functions, one per family -------------------------------------------------------


def _resnet(m: nn.Module) -> GroupSpec:
    return [("stem", ["conv1", "bn1"])] + [(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)]


def _pool_blocks(m: nn.Module, prefix: str) -> GroupSpec:
    """Plain conv stacks (VGG, AlexNet, SqueezeNet): a block ends at each max-pool."""
    paths = _children(m, "features")
    starts = [0] + [
        i + 1
        for i, p in enumerate(paths[:-1])
        if isinstance(m.get_submodule(p), nn.MaxPool2d)
    ]
    return _named(prefix, _split_at(paths, starts))


def _vgg_like(m: nn.Module) -> GroupSpec:
    hidden = _children(m, "classifier")[:-1]  # the fully connected layers before the head
    return _pool_blocks(m, "block") + [("fc", hidden)]


def _squeezenet(m: nn.Module) -> GroupSpec:
    return _pool_blocks(m, "block")


def _googlenet(m: nn.Module) -> GroupSpec:
    return [
        ("stem", ["conv1", "conv2", "conv3"]),
        ("inception3", ["inception3a", "inception3b"]),
        ("inception4", [f"inception4{c}" for c in "abcde"]),
        ("inception5", ["inception5a", "inception5b"]),
    ]


def _inception_v3(m: nn.Module) -> GroupSpec:
    return [
        (
            "stem",
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ),
        ("mixed5", ["Mixed_5b", "Mixed_5c", "Mixed_5d"]),
        ("mixed6", [f"Mixed_6{c}" for c in "abcde"]),
        ("mixed7", ["Mixed_7a", "Mixed_7b", "Mixed_7c"]),
    ]


def _mobile(m: nn.Module) -> GroupSpec:
    """EfficientNet (v1, v2), MobileNet v2/v3: features[0] is the stem, features[-1] the final
    1x1 conv (kept with the last stage); blocks in between split where they downsample."""
    paths = _children(m, "features")
    stages = _stages_by_stride(m, paths[1:-1])
    stages[-1].append(paths[-1])
    groups = [("stem", [paths[0]])] + _named("stage", stages)
    hidden = [  # MobileNetV3 has a hidden fully connected layer before its head
        p for p in _children(m, "classifier")[:-1] if any(True for _ in m.get_submodule(p).parameters())
    ]
    return groups + ([("pre_logits", hidden)] if hidden else [])


def _mnasnet(m: nn.Module) -> GroupSpec:
    paths = _children(m, "layers")  # 0-7 stem, 8-13 stacks, 14-16 final conv
    stages = _stages_by_stride(m, paths[8:14])
    stages[-1].extend(paths[14:])
    return [("stem", paths[:8])] + _named("stage", stages)


def _hierarchical(m: nn.Module) -> GroupSpec:
    """ConvNeXt and Swin: features = [stem, stage1, down, stage2, down, stage3, down, stage4],
    then a final norm (kept with stage 4)."""
    paths = _children(m, "features")
    groups: GroupSpec = [("stem", [paths[0]]), ("stage1", [paths[1]])]
    for i, start in enumerate(range(2, len(paths), 2)):
        groups.append((f"stage{i + 2}", paths[start : start + 2]))
    final_norm = "classifier.0" if hasattr(m, "classifier") else "norm"
    groups[-1][1].append(final_norm)
    return groups


def _maxvit(m: nn.Module) -> GroupSpec:
    blocks = _children(m, "blocks")
    return (
        [("stem", ["stem"])]
        + [(f"stage{i + 1}", [p]) for i, p in enumerate(blocks)]
        + [("pre_logits", ["classifier.2", "classifier.3"])]
    )


def _vit(m: nn.Module) -> GroupSpec:
    layers = _children(m, "encoder.layers")
    chunks = _even_chunks(layers, 4)
    chunks[-1].append("encoder.ln")
    groups: GroupSpec = [("embed", ["conv_proj", "class_token", "encoder.pos_embedding"])]
    groups += _named("blocks", chunks)
    if hasattr(m.heads, "pre_logits"):
        groups.append(("pre_logits", ["heads.pre_logits"]))
    return groups


def _densenet(m: nn.Module) -> GroupSpec:
    return [
        ("stem", ["features.conv0", "features.norm0"]),
        ("block1", ["features.denseblock1", "features.transition1"]),
        ("block2", ["features.denseblock2", "features.transition2"]),
        ("block3", ["features.denseblock3", "features.transition3"]),
        ("block4", ["features.denseblock4", "features.norm5"]),
    ]


def _regnet(m: nn.Module) -> GroupSpec:
    return [("stem", ["stem"])] + [
        (f"stage{i + 1}", [p]) for i, p in enumerate(_children(m, "trunk_output"))
    ]


def _shufflenet(m: nn.Module) -> GroupSpec:
    return [
        ("stem", ["conv1"]),
        ("stage2", ["stage2"]),
        ("stage3", ["stage3"]),
        ("stage4", ["stage4", "conv5"]),
    ]


# --- where LoRA goes, one function per kind of family ------------------------------------------
# peft can adapt a layer only where the model calls it: torchvision's attention reads the weights of
# nn.MultiheadAttention's out_proj and of Swin's qkv and proj without calling those layers, so LoRA
# there would never run. tests/test_families.py checks that every layer named here gets a gradient.


def _mlp_linears(m: nn.Module) -> List[str]:
    return [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and re.search(r"\.mlp\.\d+$", n)]


def _lora_vit(m: nn.Module) -> LoraSpec:
    """Each encoder block's MLP (two linears) and its attention's query/key/value projection
    (``in_proj_weight``, adapted as a parameter while the attention runs). Not the patch embedding."""
    attention = [f"{n}.in_proj_weight" for n, mod in m.named_modules() if isinstance(mod, nn.MultiheadAttention)]
    return _mlp_linears(m), attention


def _lora_swin(m: nn.Module) -> LoraSpec:
    """Each block's MLP (two linears): Swin's windowed attention reads its qkv and proj weights directly."""
    return _mlp_linears(m), []


FAMILIES: Tuple[Family, ...] = (
    Family("resnet", r"^(resnet|resnext|wide_resnet)\d", head="fc", groups=_resnet),
    Family("vgg", r"^vgg\d", head="classifier.6", groups=_vgg_like),
    Family("alexnet", r"^alexnet$", head="classifier.6", groups=_vgg_like, min_input=63),
    Family("squeezenet", r"^squeezenet", head="classifier.1", groups=_squeezenet, min_input=48),
    Family(
        "googlenet",
        r"^googlenet$",
        head="fc",
        groups=_googlenet,
        aux_heads=("aux1.fc2", "aux2.fc2"),
        aux_modules=("aux1", "aux2"),
        accepts_aux_logits=True,
        random_init_kwargs={"init_weights": True},
    ),
    Family(
        "inception_v3",
        r"^inception_v3$",
        head="fc",
        groups=_inception_v3,
        aux_heads=("AuxLogits.fc",),
        aux_modules=("AuxLogits",),
        accepts_aux_logits=True,
        random_init_kwargs={"init_weights": True},
        min_input=75,
    ),
    Family("efficientnet", r"^efficientnet_b\d$", head="classifier.1", groups=_mobile),
    Family("efficientnet_v2", r"^efficientnet_v2_", head="classifier.1", groups=_mobile),
    Family("mobilenet_v2", r"^mobilenet_v2$", head="classifier.1", groups=_mobile),
    Family("mobilenet_v3", r"^mobilenet_v3_", head="classifier.3", groups=_mobile),
    Family("mnasnet", r"^mnasnet", head="classifier.1", groups=_mnasnet),
    Family("convnext", r"^convnext_", head="classifier.2", groups=_hierarchical),
    Family("swin", r"^swin_", head="head", groups=_hierarchical, lora=_lora_swin),
    Family("maxvit", r"^maxvit_", head="classifier.5", groups=_maxvit, min_input=224),
    Family("vit", r"^vit_", head="heads.head", groups=_vit, input_size_kwarg=True, lora=_lora_vit),
    Family("densenet", r"^densenet", head="classifier", groups=_densenet),
    Family("regnet", r"^regnet_", head="fc", groups=_regnet),
    Family("shufflenet", r"^shufflenet_v2_", head="fc", groups=_shufflenet),
)


def family_of(model_name: str) -> Optional[Family]:
    for fam in FAMILIES:
        if re.search(fam.pattern, model_name):
            return fam
    return None
