"""Face restoration as AUTOMATIC1111 does it, on spandrel's networks, in A1111's folders.

Networks come from spandrel: GFPGAN (v1 clean: GFPGANv1.3/1.4) and RestoreFormer from spandrel
itself, CodeFormer from ``spandrel_extra_arches``; any other face model spandrel knows (its
``purpose == "FaceSR"``) is accepted too. Licences (of the architectures and, as released, of
their weights): GFPGAN Apache-2.0; RestoreFormer Apache-2.0 (spandrel core is MIT);
CodeFormer S-Lab License 1.0, **non-commercial use only** (``spandrel_extra_arches`` is MIT
itself but carries architectures under restrictive licences: review them before commercial use).

GFPGAN and CodeFormer are built at the sizes read from the tensors rather than spandrel's fixed
512x512 ones, so a tiny random model in the released key layout runs through the same network code
as the real ones (for the released sizes the result is exactly spandrel's own model).

Pipeline (A1111's ``restore_with_face_helper``, i.e. facexlib's ``FaceRestoreHelper``): when
``detection_Resnet50_Final.pth`` is in ``models/GFPGAN`` (where A1111 keeps it), faces are found
by RetinaFace (ResNet-50) with 5 landmarks, each is warped by a similarity transform onto the FFHQ
512x512 template, restored, warped back and pasted with ParseNet's face mask
(``parsing_parsenet.pth``) or, without it, facexlib's eroded and blurred square. Without the
detector, OpenCV's Haar cascade gives unaligned boxes and a square crop with a feathered paste
(muralist's earlier behaviour), and a warning names the files to add. ``visibility`` then blends the
result over the original like A1111's ``gfpgan_visibility``/``codeformer_visibility``.

RetinaFace and ParseNet are written here (torchvision's ResNet-50 backbone, torchvision NMS, OpenCV
warps) from the paper and facexlib's documented behaviour, loading facexlib's released files:
facexlib itself requires ``opencv-python`` (the GUI build, which clashes with the
``opencv-python-headless`` muralist uses) and imports numba/filterpy/matplotlib for its tracker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InvalidRequestError, ModelFileError, MuralistError
from ..models import files
from ..models.manager import ModelManager
from ..paths import DataDirs

log = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), in image pixels

CODEFORMER = "CodeFormer"
GFPGAN = "GFPGAN"
RESTOREFORMER = "RestoreFormer"

# The facexlib files A1111 keeps next to the GFPGAN weights (models/GFPGAN).
DETECTION_FILE = "detection_Resnet50_Final.pth"
PARSING_FILE = "parsing_parsenet.pth"

# ---------------------------------------------------------------------------------------------------
# Networks (spandrel)
# ---------------------------------------------------------------------------------------------------

_install_lock = threading.Lock()
_installed = False


def _registry() -> Any:
    """spandrel's registry with the extra (non-commercial) architectures added, once per process."""
    global _installed
    import spandrel

    with _install_lock:
        if not _installed:
            import spandrel_extra_arches

            # ignore_duplicates: another part of muralist (the upscalers) may have installed them.
            spandrel_extra_arches.install(ignore_duplicates=True)
            _installed = True
    return spandrel.MAIN_REGISTRY


def _count(sd: Mapping[str, torch.Tensor], prefix: str, suffix: str) -> int:
    """How many ``prefix<N>suffix`` keys there are (e.g. the layers of a ModuleList)."""
    pattern = re.compile(re.escape(prefix) + r"\d+" + re.escape(suffix) + "$")
    return sum(1 for k in sd if pattern.match(k))


def gfpgan_net(**sizes: Any) -> nn.Module:
    """spandrel's GFPGANv1Clean at ``sizes`` (its constructor's keywords; defaults: the release)."""
    from spandrel.architectures.GFPGAN import GFPGAN as GFPGANv1Clean

    return GFPGANv1Clean(**sizes)


def _gfpgan_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """GFPGANv1Clean's constructor sizes from the tensors (spandrel's loader assumes the release's)."""
    dec = "stylegan_decoder."
    log_size = _count(sd, "conv_body_up.", ".conv1.weight") + 2
    num_style_feat = sd[f"{dec}style_conv1.modulated_conv.modulation.weight"].shape[1]
    narrow = sd[f"{dec}constant_input.weight"].shape[1] / 512
    multiplier: float = 2
    if log_size >= 6:  # widths beyond 32x32 scale with the multiplier
        multiplier = sd[f"{dec}style_convs.6.modulated_conv.weight"].shape[1] / (256 * narrow)
        multiplier = round(multiplier) if abs(multiplier - round(multiplier)) < 1e-6 else multiplier
    scale_out, scale_in = sd["condition_scale.0.2.weight"].shape[:2]
    return dict(
        out_size=2**log_size,
        num_style_feat=num_style_feat,
        channel_multiplier=multiplier,
        num_mlp=_count(sd, f"{dec}style_mlp.", ".weight"),
        input_is_latent=True,  # as GFPGANer (and A1111) build v1.3/1.4; not in the tensors
        different_w=sd["final_linear.weight"].shape[0] != num_style_feat,
        narrow=narrow,
        sft_half=scale_out == scale_in,
    )


_RELEASED_CODEFORMER = dict(
    img_size=512, nf=64, ch_mult=(1, 2, 2, 4, 4, 8), res_blocks=2, attn_resolutions=(16,), emb_dim=256
)


def codeformer_net(
    img_size: int = 512,
    nf: int = 64,
    ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
    res_blocks: int = 2,
    attn_resolutions: Sequence[int] = (16,),
    codebook_size: int = 1024,
    emb_dim: int = 256,
    dim_embd: int = 512,
    n_head: int = 8,
    n_layers: int = 9,
    connect_list: Sequence[str] = ("32", "64", "128", "256"),
) -> nn.Module:
    """spandrel's CodeFormer; at other than the released VQGAN sizes its encoder, codebook,
    generator and fusion layers are rebuilt from spandrel's own blocks at the sizes asked for."""
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer
    from spandrel_extra_arches.architectures.CodeFormer.__arch import codeformer as cf

    connect = [str(c) for c in connect_list]
    latent = img_size // 2 ** (len(ch_mult) - 1)
    vq = dict(
        img_size=img_size, nf=nf, ch_mult=tuple(ch_mult), res_blocks=res_blocks,
        attn_resolutions=tuple(attn_resolutions), emb_dim=emb_dim,
    )  # fmt: skip
    released = vq == _RELEASED_CODEFORMER
    with torch.device("meta") if not released else contextlib.nullcontext():
        net = CodeFormer(
            dim_embd=dim_embd, n_head=n_head, n_layers=n_layers, codebook_size=codebook_size,
            # Its fusion tables only know the release's resolutions; others are wired below.
            latent_size=latent * latent, connect_list=connect if released else [],
        )  # fmt: skip
    if released:
        return net.eval()
    # Built on the meta device (nothing allocated for the full-size parts), then resized.
    with torch.device("meta"):
        net.encoder = cf.Encoder(3, nf, emb_dim, list(ch_mult), res_blocks, img_size, list(attn_resolutions))
        net.generator = cf.Generator(nf, list(ch_mult), res_blocks, img_size, list(attn_resolutions), emb_dim)
        net.quantize = _any_latent_quantizer()(codebook_size, emb_dim, 0.25)
        net.feat_emb = nn.Linear(emb_dim, dim_embd)
        enc, gen = _fusion_blocks(net, img_size, latent, connect)
        net.fuse_encoder_block, net.fuse_generator_block = enc, gen
        net.connect_list = connect
        net.fuse_convs_dict = nn.ModuleDict()
        for c in connect:
            width = nf * ch_mult[int(math.log2(img_size // int(c)))]
            net.fuse_convs_dict[c] = cf.Fuse_sft_block(width, width)
    net.resolution, net.nf, net.ch_mult = img_size, nf, list(ch_mult)
    net.to_empty(device="cpu")
    # Fresh initial values (to_empty leaves memory as it was); loading a file overwrites them all.
    for m in net.modules():
        init = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
        if init is not None:
            init()
    with torch.no_grad():
        net.position_emb.zero_()
    return net.eval()


@functools.cache
def _any_latent_quantizer() -> type:
    from spandrel_extra_arches.architectures.CodeFormer.__arch.codeformer import VectorQuantizer

    class AnyLatentQuantizer(VectorQuantizer):
        """spandrel's codebook; its CodeFormer asks for a 16x16x256 latent, the real size is used."""

        def get_codebook_feat(self, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
            b = shape[0]
            side = math.isqrt(indices.numel() // b)
            return super().get_codebook_feat(indices, [b, side, side, self.emb_dim])

    return AnyLatentQuantizer


def _fusion_blocks(net: nn.Module, img_size: int, latent: int, connect: list[str]) -> tuple[dict, dict]:
    """Where features leave the encoder / enter the generator per resolution: the encoder's last
    ResBlock there, the generator's first (its last at the latent size) -- the rule behind the
    release's hard-coded tables, so that other sizes wire up the same way."""
    from spandrel_extra_arches.architectures.CodeFormer.__arch import codeformer as cf

    def walk(blocks: nn.ModuleList, res: int, step: Callable[[int], int]) -> list[tuple[bool, int]]:
        out = []
        for block in blocks:
            out.append((isinstance(block, cf.ResBlock), res))
            if isinstance(block, (cf.Downsample, cf.Upsample)):
                res = step(res)
        return out

    enc = walk(net.encoder.blocks, img_size, lambda r: r // 2)[:-5]  # not the non-local tail
    gen = walk(net.generator.blocks, latent, lambda r: r * 2)
    enc_table, gen_table = {}, {}
    for c in connect:
        r = int(c)
        e = [i for i, (is_res, res) in enumerate(enc) if is_res and res == r]
        g = [i for i, (is_res, res) in enumerate(gen) if is_res and res == r and i >= 4]
        if not e or not g:
            raise ValueError(f"CodeFormer has no {r}x{r} features to connect")
        enc_table[c] = e[-1]
        gen_table[c] = g[-1] if r == latent else g[0]
    return enc_table, gen_table


def _block_kinds(sd: Mapping[str, torch.Tensor], prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, defining shape) of each ``prefix<N>`` block, told apart by the keys it owns."""
    out: list[tuple[str, tuple[int, ...]]] = []
    i = 0
    while True:
        p = f"{prefix}{i}."
        if f"{p}q.weight" in sd:
            out.append(("attn", tuple(sd[f"{p}q.weight"].shape)))
        elif f"{p}conv1.weight" in sd:
            out.append(("res", tuple(sd[f"{p}conv1.weight"].shape)))
        elif f"{p}conv.weight" in sd:
            out.append(("down", tuple(sd[f"{p}conv.weight"].shape)))
        elif f"{p}weight" in sd:
            shape = tuple(sd[f"{p}weight"].shape)
            out.append(("conv" if len(shape) == 4 else "norm", shape))
        else:
            break
        i += 1
    if len(out) < 7:
        raise ValueError(f"too few {prefix.rstrip('.')} entries")
    return out


def _codeformer_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """CodeFormer's sizes from the tensors (spandrel's loader reads only the transformer's)."""
    kinds = _block_kinds(sd, "encoder.blocks.")
    # kinds[0] is the input conv; the last five are the non-local blocks, norm and output conv.
    levels: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    for kind in kinds[1:-5]:
        if kind[0] == "down":
            levels.append([])
        else:
            levels[-1].append(kind)
    nf = sd["encoder.blocks.0.weight"].shape[0]
    ch_mult = []
    for level in levels:
        outs = [shape[0] for k, shape in level if k == "res"]
        if not outs or outs[-1] % nf:
            raise ValueError("encoder layout is not recognised")
        ch_mult.append(outs[-1] // nf)
    latent = math.isqrt(sd["position_emb"].shape[0])
    img_size = latent * 2 ** (len(levels) - 1)
    codebook_size, emb_dim = sd["quantize.embedding.weight"].shape
    return dict(
        img_size=img_size,
        nf=nf,
        ch_mult=tuple(ch_mult),
        res_blocks=sum(1 for k, _ in levels[0] if k == "res"),
        attn_resolutions=tuple(
            img_size // 2**i for i, lv in enumerate(levels) if any(k == "attn" for k, _ in lv)
        ),
        codebook_size=codebook_size,
        emb_dim=emb_dim,
        dim_embd=sd["position_emb"].shape[1],
        n_layers=len({k.split(".")[1] for k in sd if k.startswith("ft_layers.")}),
        connect_list=sorted({k.split(".")[1] for k in sd if k.startswith("fuse_convs_dict.")}, key=int),
    )


@dataclasses.dataclass
class FaceNet:
    """A loaded face-restoration network: spandrel's descriptor, its architecture and face size."""

    descriptor: Any  # spandrel.ImageModelDescriptor
    arch: str
    size: int  # side of the aligned face crop the network takes

    @property
    def model(self) -> nn.Module:
        return self.descriptor.model

    def to(self, device: str | torch.device) -> FaceNet:
        self.descriptor.to(device)
        return self

    def __call__(self, x: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
        """Restore faces ``x`` (b, 3, size, size) in [-1, 1] RGB -> the same, as A1111 calls them."""
        if self.arch == CODEFORMER:
            return self.model(x, weight=weight, adain=True)[0]
        if self.arch == GFPGAN:
            # Stored noise maps: reproducible output (GFPGANer draws fresh noise per call).
            return self.model(x, return_rgb=False, randomize_noise=False)[0]
        # Everything else through spandrel's own call, which takes and gives [0, 1].
        return self.descriptor((x + 1) / 2) * 2 - 1


def _unwrap(obj: Any) -> Any:
    # BasicSR checkpoints keep the weights under "params_ema" (EMA, what A1111 uses) or "params".
    if isinstance(obj, dict):
        for key in ("params_ema", "params"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    return obj


def load_face_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, ``params_ema``/``params`` unwrapped, ``module.`` stripped.

    ``files.load_state_dict`` keeps only top-level tensors, which would drop the BasicSR wrapper,
    so pickles go through the same safe ``weights_only`` loader it uses and are unwrapped here.
    """
    path = Path(path)
    if path.suffix.lower() in files.SAFETENSORS_EXTS:
        sd = files.load_state_dict(path)
    else:
        sd = files.tensors_of(path, _unwrap(files.load_pickle(path)))
    # DataParallel saves (the released RetinaFace) prefix every key with "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


_NAMES = {"GFPGAN": GFPGAN, "CodeFormer": CODEFORMER, "RestoreFormer": RESTOREFORMER}


def detect_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """The architecture spandrel reads off the key layout (``"CodeFormer"``, ``"GFPGAN"``,
    ``"RestoreFormer"`` or another spandrel id); ModelFileError when spandrel knows none."""
    for support in _registry().architectures("detection"):
        if support.detect(sd):
            arch_id = str(support.architecture.id)
            return _NAMES.get(arch_id, arch_id)
    raise ModelFileError(
        "not a face-restoration model spandrel knows (GFPGAN v1.3/1.4, CodeFormer, RestoreFormer, ...)"
    )


def _descriptor(model: nn.Module, sd: Mapping[str, torch.Tensor], arch: str, size: int) -> Any:
    from spandrel import ImageModelDescriptor, SizeRequirements

    support = _registry().get(arch)
    # Same descriptor spandrel's own loader builds; its constructor loads ``sd`` strictly.
    return ImageModelDescriptor(
        model, dict(sd), architecture=support.architecture, purpose="FaceSR", tags=[],
        supports_half=False, supports_bfloat16=True, scale=1, input_channels=3, output_channels=3,
        size_requirements=SizeRequirements(minimum=size), call_fn=lambda m, x: m(x)[0],
    )  # fmt: skip


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def build_face_model(sd: Mapping[str, torch.Tensor], name: str = "weights") -> FaceNet:
    """A face-restoration network of the detected architecture with ``sd`` loaded, in eval mode."""
    arch = detect_architecture(sd)
    try:
        if arch == GFPGAN:
            sizes = _gfpgan_sizes(sd)
            desc = _descriptor(gfpgan_net(**sizes), sd, arch, sizes["out_size"])
            size = sizes["out_size"]
        elif arch == CODEFORMER:
            sizes = _codeformer_sizes(sd)
            desc = _descriptor(codeformer_net(**sizes), sd, arch, sizes["img_size"])
            size = sizes["img_size"]
        else:
            desc = _registry().load(dict(sd))
            size = 512  # RestoreFormer and the others are trained on FFHQ 512x512 faces
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ModelFileError(f"{name}: {arch} layout is not recognised ({_first_line(exc)})") from None
    except RuntimeError as exc:  # load_state_dict: missing keys or shape mismatches
        msg = _first_line(exc)
        if "Missing key" in str(exc):
            msg = (
                "lacks tensors: " + str(exc).split("Missing key(s) in state_dict:")[-1].strip().split(",")[0]
            )
        raise ModelFileError(f"{name}: {arch} weights do not fit the layout ({msg})") from None
    if getattr(desc, "purpose", None) != "FaceSR":
        raise ModelFileError(
            f"{name}: spandrel reads this as {arch}, which is not a face-restoration model "
            "(upscalers go in models/ESRGAN, RealESRGAN or SwinIR)"
        )
    desc.model.requires_grad_(False)
    desc.eval()
    return FaceNet(desc, arch, int(size))


# ---------------------------------------------------------------------------------------------------
# RetinaFace (ResNet-50) with 5 landmarks, in detection_Resnet50_Final.pth's key layout
# ---------------------------------------------------------------------------------------------------


def _conv_bn(cin: int, cout: int, k: int, relu: bool) -> nn.Sequential:
    # Keys "<name>.0.weight" (conv, no bias) and "<name>.1.*" (BatchNorm), as in the released file.
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())  # the ResNet-50 variant uses slope 0 (out_channels > 64)
    return nn.Sequential(*layers)


class _SSH(nn.Module):
    """Single Stage Headless context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv3X3 = _conv_bn(ch, ch // 2, 3, relu=False)
        self.conv5X5_1 = _conv_bn(ch, ch // 4, 3, relu=True)
        self.conv5X5_2 = _conv_bn(ch // 4, ch // 4, 3, relu=False)
        self.conv7X7_2 = _conv_bn(ch // 4, ch // 4, 3, relu=True)
        self.conv7x7_3 = _conv_bn(ch // 4, ch // 4, 3, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        return F.relu(
            torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], 1)
        )


class _Head(nn.Module):
    def __init__(self, ch: int, per_anchor: int, anchors: int = 2) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(ch, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (b, anchors*k, h, w) -> (b, h*w*anchors, k): the order the prior boxes are made in.
        return self.conv1x1(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace (Deng et al. 2019) on ResNet-50: FPN over C3-C5, SSH context, and per level 2
    anchors that predict a face score, a box and 5 landmarks (eyes, nose, mouth corners)."""

    MIN_SIZES = ((16, 32), (64, 128), (256, 512))
    STEPS = (8, 16, 32)
    VARIANCE = (0.1, 0.2)
    MEAN_BGR = (104.0, 117.0, 123.0)

    def __init__(self, out_ch: int = 256) -> None:
        super().__init__()
        from torchvision.models import resnet50
        from torchvision.models._utils import IntermediateLayerGetter

        self.body = IntermediateLayerGetter(resnet50(weights=None), {"layer2": 1, "layer3": 2, "layer4": 3})
        self.fpn = nn.Module()
        for i, cin in enumerate((512, 1024, 2048), 1):
            self.fpn.add_module(f"output{i}", _conv_bn(cin, out_ch, 1, relu=True))
        self.fpn.merge1 = _conv_bn(out_ch, out_ch, 3, relu=True)
        self.fpn.merge2 = _conv_bn(out_ch, out_ch, 3, relu=True)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(out_ch), _SSH(out_ch), _SSH(out_ch)
        self.ClassHead = nn.ModuleList([_Head(out_ch, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(out_ch, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(out_ch, 10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: (b, 3, h, w) BGR minus the mean -> (boxes, face probability, landmarks) per prior."""
        c3, c4, c5 = self.body(x).values()
        f = self.fpn
        p5 = f.output3(c5)
        p4 = f.merge2(f.output2(c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest"))
        p3 = f.merge1(f.output1(c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest"))
        feats = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        loc = torch.cat([h(t) for h, t in zip(self.BboxHead, feats, strict=True)], 1)
        conf = torch.cat([h(t) for h, t in zip(self.ClassHead, feats, strict=True)], 1)
        landm = torch.cat([h(t) for h, t in zip(self.LandmarkHead, feats, strict=True)], 1)
        return loc, conf.softmax(-1), landm

    @classmethod
    def priors(cls, h: int, w: int) -> torch.Tensor:
        """Anchor (cx, cy, w, h), relative to the image, in the heads' order: level, row, column, size."""
        out = []
        for step, sizes in zip(cls.STEPS, cls.MIN_SIZES, strict=True):
            fh, fw = math.ceil(h / step), math.ceil(w / step)
            cy, cx = torch.meshgrid(
                (torch.arange(fh) + 0.5) * step / h, (torch.arange(fw) + 0.5) * step / w, indexing="ij"
            )
            for_level = [torch.stack([cx, cy, torch.full_like(cx, s / w), torch.full_like(cy, s / h)], -1)
                         for s in sizes]  # fmt: skip
            out.append(torch.stack(for_level, 2).reshape(-1, 4))
        return torch.cat(out)

    @torch.inference_mode()
    def detect(
        self, rgb: np.ndarray, conf: float = 0.97, nms: float = 0.4, resize: int = 640
    ) -> list[tuple[np.ndarray, float, np.ndarray]]:
        """Faces in an RGB uint8 image as (box x0 y0 x1 y1, score, 5x2 landmarks), best first.

        As A1111 calls facexlib: the image is resized so its short side is ``resize``, faces
        scoring above 0.97 are kept, overlaps above IoU 0.4 suppressed."""
        import cv2
        from torchvision.ops import nms as box_nms

        h0, w0 = rgb.shape[:2]
        scale = min(h0, w0) / resize
        h, w = int(h0 / scale), int(w0 / scale)
        img = cv2.resize(
            np.ascontiguousarray(rgb[:, :, ::-1]), (w, h), interpolation=cv2.INTER_LANCZOS4
        ).astype(np.float32)
        img -= np.array(self.MEAN_BGR, np.float32)
        param = next(self.parameters())
        x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None].to(param.device, param.dtype)
        loc, score, landm = (t[0].float().cpu() for t in self(x))
        pri = self.priors(h, w)
        v0, v1 = self.VARIANCE
        centre = pri[:, :2] + loc[:, :2] * v0 * pri[:, 2:]
        size = pri[:, 2:] * torch.exp(loc[:, 2:] * v1)
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1) * torch.tensor([w, h, w, h]) * scale
        points = (
            (pri[:, None, :2] + landm.reshape(-1, 5, 2) * v0 * pri[:, None, 2:])
            * torch.tensor([w, h])
            * scale
        )
        s = score[:, 1]
        keep = torch.nonzero(s > conf).flatten()
        keep = keep[box_nms(boxes[keep], s[keep], nms)]  # sorted by score, best first
        return [(boxes[i].numpy(), float(s[i]), points[i].numpy()) for i in keep.tolist()]


# ---------------------------------------------------------------------------------------------------
# ParseNet face parsing (parsing_parsenet.pth's key layout): which pixels of a 512 face are face
# ---------------------------------------------------------------------------------------------------


class _PConv(nn.Module):
    """Reflection-padded conv, optional nearest 2x upsampling before / stride 2, BN, LeakyReLU."""

    def __init__(self, cin: int, cout: int, scale: str = "none", bn: bool = False, act: bool = False) -> None:
        super().__init__()
        self.up = scale == "up"
        self.pad = nn.ReflectionPad2d(1)
        self.conv2d = nn.Conv2d(cin, cout, 3, 2 if scale == "down" else 1, bias=not bn)
        self.norm = nn.Module()
        self.norm.norm = nn.BatchNorm2d(cout) if bn else nn.Identity()  # keys "norm.norm.*"
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.norm.norm(self.conv2d(self.pad(x)))
        return F.leaky_relu(x, 0.2) if self.act else x


class _PRes(nn.Module):
    def __init__(self, cin: int, cout: int, scale: str = "none") -> None:
        super().__init__()
        # A plain conv (no norm, no activation) where the size or width changes, else identity.
        self.shortcut_func = _PConv(cin, cout, scale) if scale != "none" or cin != cout else None
        self.conv1 = _PConv(cin, cout, "up" if scale == "up" else "none", bn=True, act=True)
        self.conv2 = _PConv(cout, cout, "down" if scale == "down" else "none", bn=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut_func(x) if self.shortcut_func is not None else x
        return skip + self.conv2(self.conv1(x))


class ParseNet(nn.Module):
    """ParseNet as facexlib configures it (512 in, 512 out, 19 classes): a residual encoder down to
    32x32, 10 residual blocks, a decoder back up; heads for the parsing map and an image."""

    def __init__(self, size: int = 512, classes: int = 19, base: int = 64, depth: int = 10) -> None:
        super().__init__()

        def clip(c: int) -> int:
            return max(32, min(c, 256))

        steps = int(math.log2(size // 32))
        enc: list[nn.Module] = [_PConv(3, base)]
        ch = base
        for _ in range(steps):
            enc.append(_PRes(clip(ch), clip(ch * 2), "down"))
            ch *= 2
        self.encoder = nn.Sequential(*enc)
        self.body = nn.Sequential(*[_PRes(clip(ch), clip(ch)) for _ in range(depth)])
        dec = []
        for _ in range(steps):
            dec.append(_PRes(clip(ch), clip(ch // 2), "up"))
            ch //= 2
        self.decoder = nn.Sequential(*dec)
        self.out_img_conv = _PConv(clip(ch), 3)
        self.out_mask_conv = _PConv(clip(ch), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Parsing logits (b, classes, h, w) for faces ``x`` in [-1, 1] RGB."""
        feat = self.encoder(x)
        return self.out_mask_conv(self.decoder(feat + self.body(feat)))


# Parsing classes that count as face for the paste mask (facexlib's colour map): all but
# background (0), neck (14) and cloth/hair/hat (16-18).
_FACE_CLASSES = [i for i in range(19) if i not in (0, 14, 16, 17, 18)]


def _load_aux(cls: Callable[[], nn.Module], path: Path, what: str) -> nn.Module:
    """RetinaFace/ParseNet from facexlib's released file, with a clear error for any other file."""
    try:
        sd = load_face_state_dict(path)
    except MuralistError:
        raise
    except Exception as exc:  # any unreadable file gets the same advice
        raise ModelFileError(f"{path} could not be read ({_first_line(exc)}); {what}") from None
    net = cls()
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{path} does not hold the expected weights ({_first_line(exc)[:200]}); {what}"
        ) from None
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# Haar detection, square crop and feathered paste (the fallback without RetinaFace)
# ---------------------------------------------------------------------------------------------------

# The Haar box spans roughly brows to chin; the networks were trained on FFHQ crops that show the
# whole head, so the crop is about twice the detected box.
CROP_SCALE = 2.0


def detect_faces(image: Image.Image, min_size: int = 32) -> list[Box]:
    """Frontal faces found by OpenCV's bundled Haar cascade, largest first."""
    import cv2

    cascade = cv2.CascadeClassifier(
        os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    )
    if cascade.empty():
        raise MuralistError("OpenCV's haarcascade_frontalface_default.xml could not be loaded")
    gray = cv2.equalizeHist(np.asarray(image.convert("L")))
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
    boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in (found if len(found) else [])]
    return sorted(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)


def face_crop_box(box: Box, scale: float = CROP_SCALE) -> Box:
    """The square region cut around a face box (may reach past the image edges); only it changes."""
    x0, y0, x1, y1 = box
    side = max(2, round(max(x1 - x0, y1 - y0) * scale))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    return left, top, left + side, top + side


def _feather_mask(side: int) -> np.ndarray:
    # 1 in the middle, ramping linearly to 0 at the crop's border, so seams do not show.
    ramp = max(1.0, side / 8)
    d = np.arange(side, dtype=np.float32)
    edge = np.clip(np.minimum(d + 0.5, side - d - 0.5) / ramp, 0.0, 1.0)
    return np.minimum(edge[:, None], edge[None, :])[..., None]


def _restore_face(face: np.ndarray, model: FaceNet, weight: float) -> np.ndarray:
    """One aligned face (size, size, 3) uint8 RGB -> restored, uint8 (A1111's tensor2img rounding)."""
    param = next(model.model.parameters())
    x = torch.from_numpy(face.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = model(x.to(param.device, param.dtype), weight)
    y = (y[0].float().clamp(-1, 1) + 1) * 127.5
    return y.round().permute(1, 2, 0).cpu().numpy().astype(np.uint8)


def blend(original: Image.Image, restored: Image.Image, visibility: float) -> Image.Image:
    """A1111's visibility: ``Image.blend(original, restored, visibility)``; 0 returns the original."""
    if visibility <= 0:
        return original.copy()
    if visibility >= 1:
        return restored
    return Image.blend(original, restored, visibility)


def restore_boxes(
    image: Image.Image,
    boxes: Sequence[Box],
    model: FaceNet,
    visibility: float = 1.0,
    weight: float = 0.5,
) -> Image.Image:
    """Restore the faces at ``boxes`` (x0, y0, x1, y1) with square, unaligned crops and paste them
    back; nothing outside ``face_crop_box(box)`` changes (the Haar fallback)."""
    original = image.convert("RGB")
    if visibility <= 0 or not boxes:
        return original.copy()
    src = np.asarray(original)
    out = src.astype(np.float32)
    h, w = src.shape[:2]
    for box in boxes:
        x0, y0, x1, y1 = face_crop_box(box)
        side = x1 - x0
        # Edge-replicate where the square reaches past the image, so the face stays centred.
        ys = np.clip(np.arange(y0, y1), 0, h - 1)
        xs = np.clip(np.arange(x0, x1), 0, w - 1)
        crop = Image.fromarray(np.ascontiguousarray(src[ys][:, xs]))
        face = np.asarray(crop.resize((model.size, model.size), Image.Resampling.LANCZOS))
        restored = Image.fromarray(_restore_face(face, model, weight)).resize(
            (side, side), Image.Resampling.LANCZOS
        )
        restored_f = np.asarray(restored, dtype=np.float32)
        mask = _feather_mask(side)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
        region = out[cy0:cy1, cx0:cx1]
        out[cy0:cy1, cx0:cx1] = region + (restored_f[sl] - region) * mask[sl]
    result = Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))
    return blend(original, result, visibility)


# ---------------------------------------------------------------------------------------------------
# Aligned path: 5-point similarity transform to the FFHQ template, inverse warp, masked paste
# ---------------------------------------------------------------------------------------------------

# Where the eyes, nose tip and mouth corners sit in a 512x512 FFHQ-aligned face (facexlib's template).
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]], np.float32,
)  # fmt: skip


@dataclasses.dataclass
class Face:
    """A detected face: RetinaFace's box, score and 5 landmarks in image pixels."""

    box: np.ndarray
    score: float
    landmarks: np.ndarray


def align_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """2x3 similarity transform (rotation, uniform scale, shift) taking the landmarks onto the
    template for a ``size`` face, least-median-of-squares as facexlib fits it."""
    import cv2

    template = FFHQ_TEMPLATE_512 * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(landmarks.astype(np.float32), template, method=cv2.LMEDS)
    if matrix is None:
        raise MuralistError("face landmarks are degenerate")
    return matrix


def _parse_mask(face: np.ndarray, parser: nn.Module) -> np.ndarray:
    """Soft face mask (size, size) in 0..1 from ParseNet, blurred as facexlib blurs it."""
    import cv2

    x = cv2.resize(face, (512, 512), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 127.5 - 1.0
    param = next(parser.parameters())
    with torch.inference_mode():
        logits = parser(torch.from_numpy(x).permute(2, 0, 1)[None].to(param.device, param.dtype))
    labels = logits[0].argmax(0).cpu().numpy()
    mask = np.isin(labels, _FACE_CLASSES).astype(np.float64) * 255.0
    mask = cv2.GaussianBlur(cv2.GaussianBlur(mask, (101, 101), 11), (101, 101), 11)
    mask[:10], mask[-10:], mask[:, :10], mask[:, -10:] = 0, 0, 0, 0
    return cv2.resize(mask / 255.0, face.shape[1::-1])


def restore_aligned(
    image: Image.Image,
    faces: Sequence[Face],
    model: FaceNet,
    visibility: float = 1.0,
    weight: float = 0.5,
    parser: nn.Module | None = None,
) -> Image.Image:
    """A1111's pipeline: align each face to the template, restore, warp back and paste with the
    ParseNet mask (or facexlib's eroded, blurred square); nothing outside the faces changes."""
    import cv2

    original = image.convert("RGB")
    if visibility <= 0 or not faces:
        return original.copy()
    src = np.asarray(original)
    h, w = src.shape[:2]
    out = src.astype(np.float32)
    size = model.size
    for face in faces:
        matrix = align_matrix(face.landmarks, size)
        # Outside the image the crop is facexlib's grey (135, 133, 132 BGR).
        crop = cv2.warpAffine(
            src, matrix, (size, size), borderMode=cv2.BORDER_CONSTANT, borderValue=(132, 133, 135)
        )
        restored = _restore_face(crop, model, weight)
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(restored, inverse, (w, h)).astype(np.float32)
        if parser is not None:
            soft = cv2.warpAffine(_parse_mask(restored, parser), inverse, (w, h), flags=cv2.INTER_AREA)
        else:
            square = cv2.warpAffine(np.ones((size, size), np.float32), inverse, (w, h))
            square = cv2.erode(square, np.ones((2, 2), np.uint8))
            back *= square[..., None]
            edge = int(float(square.sum()) ** 0.5) // 20
            # A band of ``edge`` px fades in; the restored face never shows past its own square.
            centre = cv2.erode(square, np.ones((max(2 * edge, 1), max(2 * edge, 1)), np.uint8))
            soft = cv2.GaussianBlur(centre, (2 * edge + 1, 2 * edge + 1), 0)
        soft = soft[..., None].astype(np.float32)
        out = soft * back + (1 - soft) * out
    result = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))  # truncates, as facexlib does
    return blend(original, result, visibility)


# ---------------------------------------------------------------------------------------------------
# A1111 folders
# ---------------------------------------------------------------------------------------------------

# Folder under models/ and the file name A1111 downloads there.
_FOLDERS = {CODEFORMER: ("Codeformer", "codeformer-v0.1.0.pth"), GFPGAN: ("GFPGAN", "GFPGANv1.4.pth")}
_EXTS = (".pth", ".safetensors")
_AUX = {DETECTION_FILE, PARSING_FILE}


class FaceRestorers:
    """CodeFormer/GFPGAN weights from an A1111 data folder (``models/Codeformer``, ``models/GFPGAN``).

    Each folder's file is loaded with spandrel; it must hold the architecture the restorer is named
    after, except that RestoreFormer (GFPGANer runs it too) or any other face model spandrel knows
    also serves as GFPGAN. The facexlib files
    ``detection_Resnet50_Final.pth`` / ``parsing_parsenet.pth`` in ``models/GFPGAN`` switch on
    A1111's aligned pipeline.

    ``dirs`` is a ``DataDirs`` or the data folder itself. Networks load on first use and are kept
    in ``manager`` (evicted by its budget); concurrent requests load each file once.
    """

    def __init__(
        self,
        dirs: DataDirs | str | os.PathLike[str],
        device: str | torch.device = "cpu",
        manager: ModelManager | None = None,
    ) -> None:
        root = dirs.root if isinstance(dirs, DataDirs) else Path(dirs)
        self.folders = {name: root / "models" / folder for name, (folder, _) in _FOLDERS.items()}
        self.device = torch.device(device)
        # Loaded networks live in the worker's manager (one budget for all kinds), else a private one.
        self.manager = manager if manager is not None else ModelManager(self.device)
        self._warned: set[str] = set()

    def find(self, model: str) -> Path:
        """The weights file for ``model``: A1111's default name if present, else the first .pth there."""
        name = self._canonical(model)
        folder = self.folders[name]
        default = folder / _FOLDERS[name][1]
        if default.is_file():
            return default
        cands = (
            sorted(
                p
                for p in folder.glob("*")
                if p.suffix.lower() in _EXTS and p.is_file() and p.name not in _AUX
            )
            if folder.is_dir()
            else []
        )
        # Prefer a file named after the model (A1111 filters GFPGAN files by name too).
        named = [p for p in cands if re.search(name, p.name, re.IGNORECASE)]
        if named or cands:
            return (named or cands)[0]
        raise MuralistError(
            f"{name} weights not found: put {_FOLDERS[name][1]} (or any {name} .pth file) in {folder}"
        )

    def _aux_path(self, filename: str) -> Path | None:
        # A1111 keeps them in models/GFPGAN for every restorer; CodeFormer's folder is also looked in.
        for folder in (self.folders[GFPGAN], self.folders[CODEFORMER]):
            if (folder / filename).is_file():
                return folder / filename
        return None

    def _request(self, model: str) -> tuple[tuple[str, str, int, int, str], Callable[[], FaceNet], int, str]:
        """(manager key, loader, size estimate, label) of ``model``'s current weights file."""
        name = self._canonical(model)
        path = self.find(name)
        st = path.stat()
        key = (name, str(path), st.st_mtime_ns, st.st_size, str(self.device))

        def load() -> FaceNet:
            sd = load_face_state_dict(path)
            arch = detect_architecture(sd)
            # The GFPGAN folder takes any other face model spandrel knows (GFPGANer runs
            # RestoreFormer too); build_face_model rejects what is not one (an upscaler, say).
            if arch != name and not (name == GFPGAN and arch != CODEFORMER):
                raise ModelFileError(
                    f"{path} holds {arch} weights, not {name}: move it to the folder it belongs in "
                    f"and put {_FOLDERS[name][1]} there"
                )
            return build_face_model(sd, str(path)).to(self.device)

        # One network per restorer, as before: a replaced or re-chosen file frees the old one.
        self.manager.discard("face", lambda k: k[0] == name and k[4] == key[4] and k != key)
        return key, load, st.st_size, f"{name} ({path.name})"

    def _aux_request(self, filename: str, cls: Callable[[], nn.Module], what: str) -> tuple | None:
        path = self._aux_path(filename)
        if path is None:
            return None
        st = path.stat()
        key = (filename, str(path), st.st_mtime_ns, st.st_size, str(self.device))

        def load() -> nn.Module:
            return _load_aux(cls, path, what).to(self.device)

        self.manager.discard("face", lambda k: k[0] == filename and k[4] == key[4] and k != key)
        return key, load, st.st_size, filename

    def load(self, model: str) -> FaceNet:
        """The network for ``model``, loaded (once per file version) from ``find(model)``."""
        return self.manager.get("face", *self._request(model))

    def alignment_warning(self) -> str | None:
        """What to add for A1111's aligned faces (None when the detector is there)."""
        if self._aux_path(DETECTION_FILE) is None:
            return (
                f"face restoration uses OpenCV's Haar detector with unaligned square crops: put facexlib's "
                f"{DETECTION_FILE} (and {PARSING_FILE} for A1111's face mask) in {self.folders[GFPGAN]} "
                "to get A1111's RetinaFace-aligned faces"
            )
        return None

    def restore(
        self,
        image: Image.Image,
        model: str = CODEFORMER,
        visibility: float = 1.0,
        weight: float = 0.5,
    ) -> Image.Image:
        """Detect faces and restore them (A1111 extras: visibility 0..1, CodeFormer weight 0..1).

        ``weight`` is CodeFormer's fidelity; GFPGAN has none and ignores it, as in A1111."""
        return self.restore_with_warnings(image, model, visibility, weight)[0]

    def restore_with_warnings(
        self,
        image: Image.Image,
        model: str = CODEFORMER,
        visibility: float = 1.0,
        weight: float = 0.5,
    ) -> tuple[Image.Image, list[str]]:
        """``restore``, also returning warnings about how it ran (the Haar fallback)."""
        if not 0 <= visibility <= 1:
            raise InvalidRequestError(
                f"face restoration visibility must be between 0 and 1, got {visibility}"
            )
        if not 0 <= weight <= 1:
            raise InvalidRequestError(f"CodeFormer weight must be between 0 and 1, got {weight}")
        if visibility == 0:
            return image.convert("RGB").copy(), []
        det_what = f"replace it with facexlib's {DETECTION_FILE} (RetinaFace ResNet-50) or remove it"
        par_what = f"replace it with facexlib's {PARSING_FILE} (ParseNet) or remove it"
        det = self._aux_request(DETECTION_FILE, RetinaFace, det_what)
        par = self._aux_request(PARSING_FILE, ParseNet, par_what) if det is not None else None
        with self.manager.use("face", *self._request(model)) as net:  # pinned while it runs
            if det is None:
                warning = self.alignment_warning() or ""
                if warning not in self._warned:  # once per process and folder, not per image
                    self._warned.add(warning)
                    log.warning(warning)
                return restore_boxes(image, detect_faces(image), net, visibility, weight), [warning]
            with self.manager.use("face", *det) as detector:
                found = detector.detect(np.asarray(image.convert("RGB")))
            # A1111 skips faces whose eyes are under 5 px apart.
            faces = [Face(b, s, p) for b, s, p in found if np.linalg.norm(p[0] - p[1]) >= 5]
            if par is None:
                return restore_aligned(image, faces, net, visibility, weight), []
            with self.manager.use("face", *par) as parser:
                return restore_aligned(image, faces, net, visibility, weight, parser), []

    @staticmethod
    def _canonical(model: str) -> str:
        for name in _FOLDERS:
            if model.lower() == name.lower():
                return name
        raise InvalidRequestError(f"unknown face restorer {model!r}; choose CodeFormer or GFPGAN")
