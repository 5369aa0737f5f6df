"""CLIP-based degradation estimator (MOR_SPEC section 3), on open_clip.

For each prompt pair (positive = clean, negative = degraded), with ``c_p``, ``c_n`` the cosine
similarities of the normalised image embedding with the two normalised text embeddings and ``tau``
the model's logit scale (``logit_scale.exp()``, 100 for the OpenAI weights):

    s_i = exp(tau c_n) / (exp(tau c_p) + exp(tau c_n)) = sigmoid(tau (c_n - c_p))

computed in float32; ``severity = mean_i s_i``.

Nothing is downloaded unless :meth:`DegradationEstimator.from_pretrained` is called with a named
pretrained tag. Local models: a directory with ``open_clip_config.json`` (``{"model_cfg": ...,
"preprocess_cfg": ...}``, open_clip's local-dir layout) and ``open_clip_model.safetensors``, as
written by :meth:`DegradationEstimator.save_local`, or a config plus a checkpoint file.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: MOR_SPEC section 3: (positive = clean, negative = degraded)
DEFAULT_PROMPT_PAIRS: tuple[tuple[str, str], ...] = (
    ("a good quality photo", "a bad quality photo"),
    ("a sharp photo", "a blurry photo"),
    ("a clean photo", "a noisy photo"),
    ("a high-resolution photo", "a low-resolution photo"),
    ("a photo with crisp edges", "a photo with jagged edges"),
    ("a detailed photo", "a smooth, textureless photo"),
    ("a clean photo", "a photo with compression artifacts"),
)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def _check_pairs(pairs) -> tuple[tuple[str, str], ...]:
    pairs = tuple(tuple(p) for p in pairs)
    if not pairs or not all(len(p) == 2 and all(isinstance(s, str) and s for s in p) for p in pairs):
        raise ValueError("prompt_pairs must be a non-empty list of (positive, negative) prompt strings")
    return pairs


def build_clip(model_cfg: dict | str) -> tuple[nn.Module, dict]:
    """An open_clip CLIP with random weights from a config dict (``embed_dim``, ``vision_cfg``,
    ``text_cfg``...) or a built-in architecture name (e.g. ``"ViT-B-32"``); never downloads."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    if isinstance(model_cfg, str):
        name = model_cfg
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip architecture {name!r}; known: {open_clip.list_models()[:10]}...")
    if not isinstance(model_cfg, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(model_cfg):
        raise ValueError("model_cfg must be a dict with 'embed_dim', 'vision_cfg' and 'text_cfg' (open_clip layout)")
    cfg = copy.deepcopy(model_cfg)
    if "hf_model_name" in cfg["text_cfg"] or "hf_tokenizer_name" in cfg["text_cfg"]:
        raise ValueError(
            "text towers from the HuggingFace hub need a download; use DegradationEstimator.from_pretrained "
            "for such models (this offline path supports open_clip's own text transformer)"
        )
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False  # never fetch timm weights
    model_class = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    return model_class(**copy.deepcopy(cfg)), model_cfg


class DegradationEstimator(nn.Module):
    """Frozen CLIP scoring ``(B, 3, H, W)`` images in ``[0, 1]`` against degradation prompt pairs.

    Args:
        clip_model: an open_clip ``CLIP`` (``encode_image``, ``encode_text``, ``logit_scale``).
        tokenizer: callable ``list[str] -> LongTensor (N, context_length)`` (open_clip tokenizer).
        prompt_pairs: ``(positive, negative)`` pairs; default :data:`DEFAULT_PROMPT_PAIRS`.
        mean, std: CLIP's per-channel normalisation (default OpenAI's).
        model_cfg: the open_clip config the model was built from (kept for :meth:`save_local`).

    ``forward(images) -> (B, P)`` scores in (0, 1), higher = more degraded.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer,
        *,
        prompt_pairs=DEFAULT_PROMPT_PAIRS,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        model_cfg: dict | None = None,
    ):
        super().__init__()
        self.clip = clip_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._text_cache: tuple[tuple, torch.Tensor] | None = None  # ((device, dtype), (P, 2, e))
        self.prompt_pairs = prompt_pairs
        self.model_cfg = model_cfg
        size = getattr(getattr(clip_model, "visual", None), "image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        # plain float constants, not buffers: ``.half()`` on the estimator must not round them
        self.mean = tuple(float(v) for v in torch.as_tensor(mean, dtype=torch.float64).flatten())
        self.std = tuple(float(v) for v in torch.as_tensor(std, dtype=torch.float64).flatten())
        # new weights make the cached text embeddings stale
        for m in (self, self.clip):
            m.register_load_state_dict_post_hook(self._weights_loaded)

    def _weights_loaded(self, module, incompatible_keys) -> None:
        self.clear_text_cache()

    @property
    def prompt_pairs(self) -> tuple[tuple[str, str], ...]:
        return self._prompt_pairs

    @prompt_pairs.setter
    def prompt_pairs(self, pairs) -> None:
        self._prompt_pairs = _check_pairs(pairs)
        self.clear_text_cache()

    def clear_text_cache(self) -> None:
        """Forgets the cached text embeddings (done automatically on new prompts or a state dict load;
        call it after changing the CLIP weights in place any other way)."""
        self._text_cache = None

    def train(self, mode: bool = True):
        """The CLIP model stays in eval mode (it is frozen)."""
        super().train(mode)
        self.clip.eval()
        return self

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: dict | str, *, checkpoint: str | os.PathLike | None = None, **kwargs):
        """Builds from an open_clip config (dict or built-in architecture name), random weights unless
        ``checkpoint`` (a local ``.safetensors``/``.pt``/``.bin`` file) is given.

        OpenAI-trained weights need the QuickGELU variant of the architecture (e.g. ``"ViT-L-14-quickgelu"``,
        or ``"quick_gelu": true`` in a config dict); the plain name builds GELU, which loads the same
        tensors but scores differently."""
        import open_clip

        clip, cfg = build_clip(model_cfg)
        if checkpoint is not None:
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(f"open_clip checkpoint {checkpoint} does not exist")
            open_clip.load_checkpoint(clip, str(checkpoint))
        context = cfg["text_cfg"].get("context_length", 77)
        return cls(clip, open_clip.tokenizer.SimpleTokenizer(context_length=context), model_cfg=cfg, **kwargs)

    @classmethod
    def from_local(cls, path: str | os.PathLike, **kwargs):
        """Loads a directory written by :meth:`save_local` (or in open_clip's local-dir layout)."""
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; pass a directory written by save_local")
        meta = json.loads(cfg_file.read_text())
        weights = [path / n for n in (WEIGHTS_NAME, "open_clip_pytorch_model.bin", "open_clip_model.pt")]
        found = [w for w in weights if w.is_file()]
        if not found:
            raise FileNotFoundError(f"{path} has no CLIP weights ({', '.join(w.name for w in weights)})")
        pre = meta.get("preprocess_cfg", {})
        kwargs.setdefault("mean", tuple(pre.get("mean", OPENAI_MEAN)))
        kwargs.setdefault("std", tuple(pre.get("std", OPENAI_STD)))
        return cls.from_config(meta.get("model_cfg", meta), checkpoint=found[0], **kwargs)

    @classmethod
    def from_pretrained(cls, model_name: str, pretrained: str, **kwargs):
        """Downloads (through open_clip) the named pretrained weights, e.g. ``("ViT-B-32", "openai")``.
        The only method that may reach the network."""
        import open_clip

        if not pretrained:
            raise ValueError("from_pretrained needs an explicit pretrained tag or file (e.g. 'openai')")
        clip = open_clip.create_model(model_name, pretrained=pretrained)
        pre = getattr(clip.visual, "preprocess_cfg", {}) or {}
        kwargs.setdefault("mean", tuple(pre.get("mean", OPENAI_MEAN)))
        kwargs.setdefault("std", tuple(pre.get("std", OPENAI_STD)))
        return cls(
            clip, open_clip.get_tokenizer(model_name), model_cfg=open_clip.get_model_config(model_name), **kwargs
        )

    def save_local(self, path: str | os.PathLike) -> Path:
        """Writes ``open_clip_config.json`` + ``open_clip_model.safetensors`` (loadable by :meth:`from_local`)."""
        from safetensors.torch import save_file

        if self.model_cfg is None:
            raise ValueError("this estimator does not know its open_clip config (built from a bare model)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        pre = {"mean": list(self.mean), "std": list(self.std)}
        (path / CONFIG_NAME).write_text(json.dumps({"model_cfg": self.model_cfg, "preprocess_cfg": pre}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.clip.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME))
        return path

    # -- scoring -----------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]``, any size -> CLIP input: the shorter side resized (bicubic,
        antialiased) to the model's size, centre-cropped, clamped to ``[0, 1]``, normalised (float32)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a tensor (B, 3, H, W) with values in [0, 1], got {getattr(images, 'shape', images)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got {images.dtype}")
        x = images.float()
        lo, hi = (float(v) for v in torch.aminmax(x.detach())) if x.numel() else (0.0, 1.0)
        if lo < -0.01 or hi > 1.01:  # e.g. [-1, 1] images: clamping would silently lose half the range
            warnings.warn(
                f"DegradationEstimator expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; they are clamped",
                stacklevel=2,
            )
        th, tw = self.image_size
        h, w = x.shape[-2:]
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        if (rh, rw) != (h, w):
            x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (rh - th) // 2, (rw - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def text_embeddings(self) -> torch.Tensor:
        """``(P, 2, e)`` normalised float32 text embeddings (positive, negative), computed once per device."""
        key = (self.clip.logit_scale.device, self.clip.logit_scale.dtype)
        if self._text_cache is None or self._text_cache[0] != key:
            prompts = [p for pair in self.prompt_pairs for p in pair]
            with torch.no_grad(), torch.autocast(key[0].type, enabled=False):
                tokens = self.tokenizer(prompts).to(key[0])
                emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
            self._text_cache = (key, emb.reshape(len(self.prompt_pairs), 2, -1))
        return self._text_cache[1]

    @property
    def tau(self) -> torch.Tensor:
        """The logit scale ``exp(logit_scale)`` as a float32 scalar."""
        return self.clip.logit_scale.detach().float().exp().reshape(())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, P)`` float32 in (0, 1) for ``images (B, 3, H, W)`` in ``[0, 1]``.

        The CLIP towers run in the estimator's own dtype and the score maths in float32, also inside a
        ``torch.autocast`` region (which is switched off here)."""
        device = self.clip.logit_scale.device
        with torch.autocast(device.type, enabled=False):
            pixels = self.preprocess(images.to(device))
            dtype = next(self.clip.visual.parameters()).dtype
            img = F.normalize(self.clip.encode_image(pixels.to(dtype)).float(), dim=-1)  # (B, e)
            cos = torch.einsum("be,pje->bpj", img, self.text_embeddings())  # (B, P, 2)
            return torch.sigmoid(self.tau * (cos[..., 1] - cos[..., 0]))

    @staticmethod
    def severity(scores: torch.Tensor) -> torch.Tensor:
        """``sev = mean_i s_i`` per sample, ``(B,)``."""
        return scores.mean(dim=-1)
