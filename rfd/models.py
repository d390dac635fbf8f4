"""Model construction and layer-name resolution.

Every rfd model takes images in [0, 1] and normalizes them itself. Keeping normalization inside the
network means that attacks, input noise (RND) and epsilon balls all live in pixel space, which is
where the papers define them, and that no caller can forget or double-apply a normalization.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

PENULTIMATE = "penultimate"


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with mean/std stored as buffers (saved in checkpoints)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class ImageClassifier(nn.Module):
    """A classifier on [0, 1] images: ``net(normalize(x))``.

    Layer names used throughout rfd (``rfd.feature_layers``, ``rfd.protect(layers=...)``) are names
    inside ``net``, i.e. timm's own names (``layer4``, ``blocks.11``, ``pre_logits``), so they match
    timm's ``feature_info`` and its documentation.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        in_chans = _in_chans(net)
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean = list(mean if mean is not None else cfg.get("mean", (0.0,) * in_chans))
        std = list(std if std is not None else cfg.get("std", (1.0,) * in_chans))
        if len(mean) != in_chans:  # e.g. an ImageNet config on a 1-channel model: average channels
            mean = [sum(mean) / len(mean)] * in_chans
            std = [sum(std) / len(std)] * in_chans
        self.normalize = Normalize(mean, std)
        self.net = net
        self.name = name or type(net).__name__
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0)) or _infer_num_classes(self.net)


def _in_chans(net: nn.Module) -> int:
    cfg = getattr(net, "pretrained_cfg", None) or {}
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return int(cfg.get("input_size", (3,))[0])


def _infer_num_classes(net: nn.Module) -> int:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 0


def create_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    in_chans: int = 3,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **timm_kwargs: Any,
) -> ImageClassifier:
    """Build a timm model that takes [0, 1] images, optionally with weights.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``"vit_base_patch16_224"`` or ``"resnet10t"``.
        num_classes: size of the new classification head.
        pretrained: load timm's pretrained weights through timm's own hub path. To use a local
            weights file through the very same path, pass
            ``pretrained_cfg_overlay=dict(file="weights.safetensors")`` with ``pretrained=True``.
        checkpoint: a Lightning ``.ckpt`` or a saved ``state_dict`` of an ``ImageClassifier``; loaded
            with ``weights_only=True`` after the model is built.
        in_chans: input channels (1 for Fashion-MNIST without channel repeat).
        img_size: input resolution for models that need it at build time (ViT/DeiT position
            embeddings); ignored by CNNs.
        mean: override of the normalization mean (default: the timm pretrained config's).
        std: override of the normalization std.
        **timm_kwargs: passed to ``timm.create_model``.

    Returns:
        An ``ImageClassifier`` in eval mode.
    """
    if name not in timm.list_models(pretrained=False) and not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() for valid names")
    kwargs = dict(timm_kwargs)
    if img_size is not None and _takes_img_size(name):
        kwargs["img_size"] = img_size
    net = timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )
    model = ImageClassifier(net, mean=mean, std=std, name=name)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model.eval()


def _takes_img_size(name: str) -> bool:
    return any(k in name for k in ("vit", "deit", "swin", "eva", "beit", "cait", "xcit"))


def load_weights(model: nn.Module, checkpoint: str | os.PathLike) -> nn.Module:
    """Load a Lightning checkpoint or plain state_dict into ``model`` (weights only, strict).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable checkpoint, or its weights do not fit the model.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip files, non-checkpoint files
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise ValueError(
            f"corrupt or unreadable checkpoint {path} ({type(e).__name__}: {reason})"
        ) from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state_dict of tensors")
    # Lightning prefixes the ClassifierModule attribute name ("model.")
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"checkpoint {path} does not match the model: {first}") from e
    return model


REPO_ROOT = Path(__file__).resolve().parents[1]


def part_path(checkpoint: str | os.PathLike) -> Path:
    """Where a trained part's checkpoint is read from: the path as given, or, when a relative
    path is missing from the working directory, the same path under the repository root (where
    the defenses' default ``runs/<name>/best.ckpt`` live)."""
    path = Path(checkpoint)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    return path


def load_part(cls: type[Any], checkpoint: str | os.PathLike, train_hint: str | None = None) -> Any:
    """A trained defense part (a ``LightningModule`` that ``train.py`` fitted: the MagNet
    autoencoder, the Defense-GAN generator) from its checkpoint, in eval mode on the CPU.

    Loaded with ``weights_only=True``: the checkpoint's hyperparameters rebuild the module and
    nothing in the file is executed. A relative path missing from the working directory is also
    tried from the repository root, where the defenses' default ``runs/<name>/best.ckpt`` live.

    Args:
        cls: the LightningModule class the checkpoint was trained as.
        checkpoint: the ``.ckpt`` file.
        train_hint: the command that makes the part, named in the error when it is missing.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable checkpoint of ``cls``.
    """
    path = part_path(checkpoint)
    if not path.is_file():
        hint = f"; train it with `{train_hint}`" if train_hint else ""
        raise FileNotFoundError(f"{cls.__name__} checkpoint not found: {path}{hint}")
    try:
        part = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, another module's weights
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise ValueError(
            f"{path} is not a readable {cls.__name__} checkpoint ({type(e).__name__}: {reason})"
        ) from e
    return part.eval()


def checkpoint_hparams(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The model hyperparameters stored in a Lightning checkpoint (``{}`` for plain state_dicts)."""
    obj = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    return dict(obj.get("hyper_parameters", {})) if isinstance(obj, dict) else {}


LEGACY_HASH_BYTES = 1 << 24  # the prefix file_hash read before it read whole files


def file_hash(path: str | os.PathLike, n_bytes: int | None = None) -> str:
    """A short content hash of a file (its size and every byte): a checkpoint's identity in
    calibration caches and run specs.

    It used to read only the first 16 MiB: a large checkpoint whose later bytes changed (a head
    retrained in place sits at the end of the file) kept its hash, and a resumed run would have
    mixed records of two models. ``n_bytes`` reads only a prefix: that older rule, to recognise
    what it wrote. Files up to 16 MiB hash as they always did.
    """
    p = Path(path)
    h = hashlib.sha256(str(p.stat().st_size).encode())
    with p.open("rb") as f:
        if n_bytes is not None:
            h.update(f.read(n_bytes))
        else:  # in blocks: a checkpoint can be larger than the memory to spare
            for block in iter(partial(f.read, LEGACY_HASH_BYTES), b""):
                h.update(block)
    return h.hexdigest()[:16]


def model_hash(model: nn.Module) -> str:
    """A content hash of a model's parameters and buffers: cache key when there is no file.

    Every byte counts, as in :func:`file_hash`: hashing only the first 64 KiB of each tensor
    would give two models that differ further into a large tensor one calibration.
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be byte-viewed
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:16]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a measurement, then every submodule's own mode back (frozen BN included)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------- layer names


def _net(model: nn.Module) -> nn.Module:
    return model.net if isinstance(model, ImageClassifier) else model


def family(model: nn.Module) -> str:
    """The architecture family that decides where "penultimate" is: resnet, vgg, vit or generic."""
    from timm.models.resnet import ResNet
    from timm.models.vgg import VGG
    from timm.models.vision_transformer import VisionTransformer

    net = _net(model)
    if isinstance(net, ResNet):
        return "resnet"
    if isinstance(net, VGG):
        return "vgg"
    if isinstance(net, VisionTransformer):
        return "vit"
    return "generic"


def _penultimate(model: nn.Module) -> str:
    net = _net(model)
    fam = family(model)
    if fam == "resnet":
        return "global_pool"  # pooled, flattened features fed to `fc`
    if fam == "vgg":
        return "pre_logits"  # the ConvMlp (fc6/fc7) output fed to the head
    if fam == "vit":
        # The normed CLS token (or pooled tokens) right before `head`; head_drop is its last module.
        for cand in ("head_drop", "fc_norm"):
            if isinstance(getattr(net, cand, None), nn.Module):
                return cand
    return _generic_penultimate(net)


def _generic_penultimate(net: nn.Module) -> str:
    """The module whose output feeds the last Linear layer, found by tracing one forward.

    Works for plain PyTorch classifiers (``nn.Sequential`` CNNs and the like) where no family rule
    applies: the last module executed before the final ``nn.Linear`` produces its input.
    """
    names = {m: n for n, m in net.named_modules() if n}
    order: list[str] = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
        for m, n in names.items()
        if not list(m.children())
    ]
    try:
        in_chans = _in_chans(net)
        size = 32
        with torch.no_grad():
            was_training = net.training
            net.eval()
            net(torch.zeros(1, in_chans, size, size))
            net.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    linear_idx = [i for i, n in enumerate(order) if isinstance(net.get_submodule(n), nn.Linear)]
    if not linear_idx or linear_idx[-1] == 0:
        raise ValueError(
            "cannot locate the penultimate layer: no module runs before the last Linear"
        )
    return order[linear_idx[-1] - 1]


def feature_layers(model: nn.Module) -> list[str]:
    """Hookable layer names of ``model``, shallow to deep, with ``"penultimate"`` first.

    For timm models the names come from ``feature_info`` (the stage outputs timm itself exposes)
    plus the pre-logits / penultimate module; for other models, every leaf module in forward order.
    """
    net = _net(model)
    names: list[str] = []
    info = getattr(net, "feature_info", None)
    if info:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else info
        names = [d["module"] for d in entries if d.get("module")]
    else:
        names = [n for n, m in net.named_modules() if n and not list(m.children())]
    pen = _penultimate(model)
    fam = family(model)
    if fam == "vgg" and "pre_logits" not in names:
        names.append("pre_logits")
    if pen not in names:
        names.append(pen)
    return [PENULTIMATE, *names]


def resolve_layer(model: nn.Module, name: str) -> str:
    """Map a user-facing layer name (or the alias) to the module path inside ``model``.

    Raises:
        ValueError: the name is neither the alias nor a module of the model; the message lists the
            valid names.
    """
    net = _net(model)
    target = _penultimate(model) if name == PENULTIMATE else name
    try:
        net.get_submodule(target)
    except AttributeError:
        valid = ", ".join(feature_layers(model))
        raise ValueError(f"unknown layer {name!r}; valid layers: {valid}") from None
    prefix = "net." if isinstance(model, ImageClassifier) else ""
    return prefix + target


def input_channels(model: nn.Module) -> int | None:
    """The channel count the model's first convolution (or patch embedding) takes, if it has one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def check_inputs(model: nn.Module, images: Tensor, labels: Tensor | None = None) -> None:
    """The input contract of every attack and of calibration, checked before any forward so that
    a mistake gets its own message rather than a conv error or a robust accuracy of 0.

    Raises:
        ValueError: images that are not a finite float (N, C, H, W) tensor in [0, 1] with the
            model's channel count and dtype, or labels that are not (N,) non-negative integers.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be an (N, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be float in [0, 1], got {images.dtype}; use images.float() / 255"
        )
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point() and images.dtype != param.dtype:
        raise ValueError(
            f"images are {images.dtype} but the model's weights are {param.dtype}; "
            f"convert with images.to({param.dtype})"
        )
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or inf values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            hint = (
                "; they look like 0-255 pixels: divide by 255" if 1 < hi <= 255 and lo >= 0 else ""
            )
            raise ValueError(
                f"images must lie in [0, 1] (rfd models normalize internally), got [{lo:.4g}, "
                f"{hi:.4g}]{hint}"
            )
    chans = input_channels(model)
    if chans is not None and images.shape[1] != chans:
        raise ValueError(f"images have {images.shape[1]} channels but the model takes {chans}")
    if labels is None:
        return
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be (N,) = ({images.shape[0]},), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")


def check_logits(logits: Tensor, labels: Tensor | None = None) -> None:
    """A model answer that cannot be judged: fewer classes than the labels need, or NaN/inf
    (without ``labels``, only the latter)."""
    if labels is not None and labels.numel() and int(labels.max()) >= logits.shape[-1]:
        raise ValueError(
            f"labels go up to {int(labels.max())} but the model outputs {logits.shape[-1]} classes"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model returned NaN or inf logits; check the model and its inputs")
