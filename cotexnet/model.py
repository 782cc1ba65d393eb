"""CoTexNet: CLIPSeg with text prompts learned from regions of interest, distilled into the image.

Built on transformers' CLIPSeg parts (``CLIPSegForImageSegmentation``: CLIP ViT image and text
encoders, frozen, and the light FiLM-conditioned decoder, trained). Equations refer to the paper as
written out in docs/method.md:

* ROI branch: ``R_i = I * M_i`` → frozen image encoder → CLS → ``pseudo_mapper`` → pseudo-token ``P_i``.
* ``T_e = E_T(SOS ⊕ "segmentation area of" ⊕ P_1..P_n ⊕ T_r ⊕ EOS)``, pooled at the true EOS.
* ``T_c = sigmoid(Map(C))`` from the query image's CLS ``C`` (Map = ``concept_mapper``).
* Eq. (9) ``T' = sigmoid((1-α)·T_e + α·T_c)``; Eqs. (11)–(12) ``T̂ = Dropout(T'·σ + μ)`` conditions
  the decoder by FiLM in training; at test time ``T̂_c = T_c·σ + μ`` and the text encoder never runs.
* Eq. (15), the loss, is :mod:`cotexnet.losses`: the model returns outputs, the loss module scores them.
"""
from __future__ import annotations

import copy
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bundle import BundleMixin, load_backbone
from .config import CoTexNetConfig
from .prompts import PromptEncoder, TextInputs, compose_text_inputs

#: CLIP's image normalisation; the model takes images in [0, 1] and applies it itself.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CoTexNetOutput:
    """What a training forward returns. Tensors absent in an ablation are ``None``."""

    logits: torch.Tensor  # (B, n+1, H, W), channel 0 = background
    condition: torch.Tensor  # T̂, the FiLM conditioning vector (B, D)
    text_embeds: torch.Tensor | None = None  # T_e
    concept: torch.Tensor | None = None  # T_c = sigmoid(concept_logits)
    concept_logits: torch.Tensor | None = None  # Map(C)
    mixed: torch.Tensor | None = None  # T' = sigmoid(mixed_logits)
    mixed_logits: torch.Tensor | None = None  # (1-α)·T_e + α·T_c


@dataclass
class EncodedFeatures:
    """What the frozen encoders give a training step: the same for a slice (and view) in every epoch, so the
    trainer may cache them (cotexnet.feature_cache). ``roi_embeds`` is ``None`` when no ROI branch runs."""

    activations: list[torch.Tensor]  # the decoder's inputs, one (B, tokens, width) per extract layer
    image_embeds: torch.Tensor  # projected CLS of the image, C (B, P)
    roi_embeds: torch.Tensor | None = None  # projected CLS of each ROI R_i (B, n, P)


class ConceptMapper(nn.Sequential):
    """Linear → GELU → Linear → LayerNorm: maps a CLS feature into another embedding space."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim), nn.LayerNorm(out_dim))


def set_attention(module: nn.Module, implementation: str) -> None:
    """Switch every CLIPSeg attention block under ``module`` (the decoder's, and the stock baseline's encoders) to
    transformers' ``"sdpa"`` or ``"eager"`` attention; both majors (4.40+, 5.x) read ``config._attn_implementation``."""
    from transformers.models.clipseg.modeling_clipseg import CLIPSegAttention

    for sub in module.modules():
        if isinstance(sub, CLIPSegAttention):
            sub.config = copy.copy(sub.config)
            sub.config._attn_implementation = implementation


def output_head(decoder: nn.Module) -> nn.ConvTranspose2d:
    """The decoder's last layer: one output channel per class after the background (:func:`widen_head`)."""
    head = decoder.transposed_convolution
    return head[-1] if isinstance(head, nn.Sequential) else head


def pooled(output) -> torch.Tensor:
    """The projected features of ``get_text_features`` / ``get_image_features``: a tensor in transformers 4, the
    output's ``pooler_output`` in transformers 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def encoder_layer(layer: nn.Module, hidden: torch.Tensor, *, causal: bool = False, cls_only: bool = False,
                  eager: bool = False) -> torch.Tensor:
    """One CLIP encoder layer (pre-norm attention, then MLP) on transformers' weights, the same in both majors.

    Attention is ``scaled_dot_product_attention`` (flash/memory-efficient kernels on a GPU, causal by flag, no
    mask tensor) or, with ``eager``, the explicit softmax(QK^T)V. ``cls_only`` computes queries, attention output
    and MLP for the CLS position alone (keys and values still come from every token).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    batch, _, dim = normed.shape
    residual = hidden[:, :1] if cls_only else hidden

    def heads(values):
        return values.view(batch, -1, attention.num_heads, attention.head_dim).transpose(1, 2)

    query = heads(attention.q_proj(normed[:, :1] if cls_only else normed))
    key, value = heads(attention.k_proj(normed)), heads(attention.v_proj(normed))
    dropout = attention.dropout if attention.training else 0.0
    if eager:
        scores = (query @ key.transpose(-1, -2)) * attention.scale
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1),
                                        torch.finfo(scores.dtype).min)
        weights = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype), dropout, attention.training)
        attended = weights @ value
    else:
        attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=causal,
                                                  scale=attention.scale)
    hidden = residual + attention.out_proj(attended.transpose(1, 2).reshape(batch, -1, dim))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def widen_head(decoder: nn.Module, num_outputs: int) -> None:
    """Give CLIPSeg's decoder ``num_outputs`` output channels, starting from its 1-channel weights.

    Every class channel starts as CLIPSeg's foreground logit and the background channel as its
    negation, so a pretrained decoder's mask is where training starts.
    """
    head_parent = decoder.transposed_convolution
    old = output_head(decoder)
    new = nn.ConvTranspose2d(old.in_channels, num_outputs, old.kernel_size, stride=old.stride)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, num_outputs, 1, 1))
        new.bias.copy_(old.bias.repeat(num_outputs))
        new.weight[:, 0].neg_()
        new.bias[0].neg_()
    if isinstance(head_parent, nn.Sequential):
        head_parent[-1] = new
    else:
        decoder.transposed_convolution = new


class CoTexNet(BundleMixin, nn.Module):
    """CoTexNet (or, with ``config.variant == "clipseg"``, the stock CLIPSeg baseline) on one config.

    ``model(images)`` is the test-time path: images only, no text encoder, logits ``(B, n+1, H, W)``.
    ``model(images, masks=..., text_ids=...)`` is the training path and returns :class:`CoTexNetOutput`,
    which :class:`~cotexnet.losses.CoTexNetLoss` scores. The constructor takes a built CLIPSeg and its
    tokenizer and never loads anything: :meth:`from_config` builds a new model from a backbone name,
    :meth:`from_pretrained` / :meth:`save_pretrained` (:mod:`cotexnet.bundle`) load and save bundles.
    """

    def __init__(self, config: CoTexNetConfig, backbone, tokenizer):
        super().__init__()
        if config.backbone_config is None:  # a loaded bundle keeps its own, as written by whichever transformers
            config.backbone_config = backbone.config.to_dict()
        self.config = config
        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer)
        self.clipseg = backbone
        self.extract_layers = list(backbone.config.extract_layers)
        set_attention(self.clipseg, config.attention)
        widen_head(self.clipseg.decoder, config.num_classes + 1)

        projection_dim = backbone.config.projection_dim
        text_dim = backbone.config.text_config.hidden_size
        self.pseudo_mapper = ConceptMapper(projection_dim, text_dim)
        self.concept_mapper = ConceptMapper(projection_dim, projection_dim)
        self.alpha = nn.Parameter(torch.tensor(config.alpha_init))
        self.sigma = nn.Parameter(torch.tensor(config.sigma_init))
        self.mu = nn.Parameter(torch.tensor(config.mu_init))
        self.noise_dropout = nn.Dropout(config.dropout)

        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        template = self.prompts.encode([config.pseudo_template])[0] if config.use_pseudo_text else []
        self.register_buffer("template_ids", torch.tensor(template, dtype=torch.long), persistent=False)
        prompt_ids = self.prompts.full_ids(config.clipseg_prompt)
        self.register_buffer("clipseg_prompt_ids", torch.tensor([prompt_ids], dtype=torch.long), persistent=False)

        for module in (self.clipseg.clip.vision_model, self.clipseg.clip.text_model):
            module.requires_grad_(False)
        self.clipseg.clip.visual_projection.requires_grad_(False)
        self.clipseg.clip.text_projection.requires_grad_(False)
        self.clipseg.clip.logit_scale.requires_grad_(False)

    @classmethod
    def from_config(cls, config: CoTexNetConfig, cache_dir: str | os.PathLike | None = None) -> "CoTexNet":
        """A new model on the backbone ``config.backbone`` names: ``tiny``, a folder, or a Hugging Face id
        (downloaded once into ``cache_dir`` or the Hugging Face cache). Trained models load with
        :meth:`from_pretrained` instead."""
        backbone, tokenizer = load_backbone(config.backbone, config.image_size, cache_dir)
        return cls(config, backbone=backbone, tokenizer=tokenizer)

    def place(self, device: torch.device | str) -> "CoTexNet":
        """Move to ``device`` in the layout that runs fastest there: on a GPU the decoder's convolutions keep their
        weights channels-last (cuDNN's fast path); on the CPU they stay contiguous, where channels-last measured
        slower (docs/performance.md). Weights are saved contiguous either way."""
        device = torch.device(device)
        self.to(device)
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        self.clipseg.decoder.transposed_convolution.to(memory_format=layout)
        return self

    # ----------------------------------------------------------------------------------- encoders
    @property
    def vision(self):
        return self.clipseg.clip.vision_model

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (grayscale or RGB) → CLIP-normalised 3-channel pixel values."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def encode_image(self, images: torch.Tensor, need_activations: bool = True):
        """Run the frozen image encoder once: decoder activations and the projected CLS embedding.

        Unless the decoder reads it, the final layer's output is needed only for the CLS token, so that
        layer computes queries, attention output and MLP for the CLS position alone (keys and values
        still come from every token): the same result for most of one layer's work less.
        """
        vision = self.vision
        hidden = vision.embeddings(self.normalize(images), interpolate_pos_encoding=True)
        hidden = vision.pre_layrnorm(hidden)
        layers = vision.encoder.layers
        last = len(layers) - 1
        cls_only_last = not (need_activations and last in self.extract_layers)
        outputs = {}
        eager = self.config.attention == "eager"
        for index, layer in enumerate(layers):
            hidden = encoder_layer(layer, hidden, cls_only=cls_only_last and index == last, eager=eager)
            if need_activations and index in self.extract_layers:
                outputs[index] = hidden
        activations = [outputs[index] for index in self.extract_layers] if need_activations else []
        cls = vision.post_layernorm(hidden[:, 0])
        return activations, self.clipseg.clip.visual_projection(cls)

    def encode_text(self, inputs: TextInputs, pseudo_tokens: torch.Tensor | None) -> torch.Tensor:
        """CLIP text encoder with pseudo-tokens injected as token embeddings at real positions.

        Runs embeddings → causal encoder layers → final layer norm → pooling at each row's EOS →
        projection, the stock ``input_ids`` path, so with no pseudo-tokens it equals
        ``get_text_features``. Parameters are frozen, but gradients flow through to the pseudo-tokens.
        """
        text = self.clipseg.clip.text_model
        ids = inputs.input_ids.to(self.template_ids.device)
        tokens = text.embeddings.token_embedding(ids)
        if pseudo_tokens is not None:
            positions = inputs.pseudo_positions.to(ids.device)
            tokens = tokens.index_copy(1, positions, pseudo_tokens.to(tokens.dtype))
        hidden = text.embeddings(inputs_embeds=tokens)
        for layer in text.encoder.layers:  # causal: no position sees the padding after its row's EOS
            hidden = encoder_layer(layer, hidden, causal=True, eager=self.config.attention == "eager")
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), inputs.eos_index.to(hidden.device)]
        return self.clipseg.clip.text_projection(pooled)

    def text_inputs(self, text_ids: list[list[int]] | None, batch_size: int) -> TextInputs:
        """The text-encoder input of each sample for the configured ablation."""
        config = self.config
        real = text_ids if (config.use_real_text and text_ids is not None) else [[] for _ in range(batch_size)]
        if len(real) != batch_size:
            raise ValueError(f"text_ids: expected {batch_size} rows (one per image), got {len(real)}")
        return compose_text_inputs(
            self.template_ids.tolist(),
            config.num_classes if config.use_pseudo_text else 0,
            real,
            sos_id=self.prompts.sos_id,
            eos_id=self.prompts.eos_id,
            pad_id=self.prompts.pad_id,
        )

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Real-text prompts (one string per image, all classes concatenated) → token ids."""
        return self.prompts.encode(prompts)

    # ------------------------------------------------------------------------------------ decoder
    def decode(self, activations: list[torch.Tensor], condition: torch.Tensor) -> torch.Tensor:
        """CLIPSeg's FiLM decoder with the ``n+1``-channel head: logits at the input resolution."""
        logits = self.clipseg.decoder(activations, condition).logits
        return logits if logits.dim() == 4 else logits.unsqueeze(1)

    def clipseg_condition(self, batch_size: int) -> torch.Tensor:
        """The stock baseline's conditioning: CLIP text features of the fixed prompt (frozen)."""
        with torch.no_grad():
            features = pooled(self.clipseg.clip.get_text_features(self.clipseg_prompt_ids))
        return features.expand(batch_size, -1)

    def concept_logits(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.concept_mapper(image_embeds)

    def test_condition(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``T̂_c = T_c·σ + μ``: the test-time conditioning, from the image alone."""
        return torch.sigmoid(self.concept_logits(image_embeds)) * self.sigma + self.mu

    # ------------------------------------------------------------------------------------ forward
    @property
    def encoder_trains(self) -> bool:
        """Whether any image-encoder weight trains (``--train-encoder``); then its pass keeps gradients."""
        return any(p.requires_grad for p in self.vision.parameters())

    @property
    def uses_roi_branch(self) -> bool:
        config = self.config
        return config.variant == "cotexnet" and config.use_text_module and (
            config.use_pseudo_text or not config.use_text_encoder)

    def encode_frozen(self, images: torch.Tensor, masks: torch.Tensor) -> EncodedFeatures:
        """The image-encoder passes of a training step: the image (with gradients when the encoder trains) and
        the ``n`` ROIs ``R_i = I * M_i`` (never: they only feed the pseudo-tokens)."""
        with nullcontext() if self.encoder_trains else torch.no_grad():
            activations, image_embeds = self.encode_image(images)
        roi_embeds = None
        if self.uses_roi_branch:
            rois = images.unsqueeze(1) * masks.unsqueeze(2).to(images.dtype)  # R_i = I * M_i
            with torch.no_grad():
                _, roi_embeds = self.encode_image(rois.flatten(0, 1), need_activations=False)
            roi_embeds = roi_embeds.view(masks.shape[0], masks.shape[1], -1)
        return EncodedFeatures(activations, image_embeds, roi_embeds)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None, text_ids: list[list[int]] | None = None,
                encoded: EncodedFeatures | None = None):
        """Test time (``masks is None``): logits ``(B, n+1, H, W)``. Training: :class:`CoTexNetOutput`.

        ``images``: (B, 1 or 3, S, S) in [0, 1]. ``masks``: (B, n, S, S) binary, one per class.
        ``text_ids``: real-text prompt token ids per image (from :meth:`encode_prompts`), no SOS/EOS.
        ``encoded``: the training step's :meth:`encode_frozen` of these images and masks, when already known.
        """
        if self.config.variant == "clipseg":
            with torch.no_grad():
                activations, _ = self.encode_image(images)
            condition = self.clipseg_condition(images.shape[0]).to(activations[0].dtype)
            logits = self.decode(activations, condition)
            return logits if masks is None else CoTexNetOutput(logits=logits, condition=condition)
        if masks is None:
            activations, image_embeds = self.encode_image(images)
            return self.decode(activations, self.test_condition(image_embeds))
        return self._training_forward(images, masks, text_ids, encoded)

    def _training_forward(self, images, masks, text_ids, encoded: EncodedFeatures | None) -> CoTexNetOutput:
        config = self.config
        batch, num_classes = masks.shape[:2]
        if num_classes != config.num_classes:
            raise ValueError(f"masks: expected {config.num_classes} class masks per image, got {num_classes}")
        encoded = encoded if encoded is not None else self.encode_frozen(images, masks)
        activations, image_embeds = encoded.activations, encoded.image_embeds
        concept_logits = self.concept_logits(image_embeds)
        concept = torch.sigmoid(concept_logits)
        if not config.use_text_module:
            condition = self.noise_dropout(concept * self.sigma + self.mu)
            return CoTexNetOutput(self.decode(activations, condition), condition, concept=concept, concept_logits=concept_logits)

        text_embeds = self.text_embeddings(encoded.roi_embeds, text_ids, batch)
        if config.kd_mode == "no_noise":
            mixed_logits = text_embeds
        else:
            mixed_logits = (1 - self.alpha) * text_embeds + self.alpha * concept
        mixed = torch.sigmoid(mixed_logits)
        condition = self.noise_dropout(mixed * self.sigma + self.mu)
        return CoTexNetOutput(
            logits=self.decode(activations, condition),
            condition=condition,
            text_embeds=text_embeds,
            concept=concept,
            concept_logits=concept_logits,
            mixed=mixed,
            mixed_logits=mixed_logits,
        )

    def text_embeddings(self, roi_embeds: torch.Tensor | None, text_ids, batch: int) -> torch.Tensor:
        """``T_e`` from ROI pseudo-tokens and real text (or, without the text encoder, from the ROIs alone);
        ``roi_embeds`` (B, n, P) from :meth:`encode_frozen`."""
        config = self.config
        pseudo = None if roi_embeds is None else self.pseudo_mapper(roi_embeds)
        if not config.use_text_encoder:
            # Text-encoder ablation: the pseudo-tokens skip E_T and go straight to its projection.
            return self.clipseg.clip.text_projection(pseudo.mean(dim=1))
        return self.encode_text(self.text_inputs(text_ids, batch), pseudo if config.use_pseudo_text else None)

    # ------------------------------------------------------------------------------------ training
    def compile_training(self, mode: str) -> None:
        """Run the training step's tensor-only parts through ``torch.compile`` in ``mode`` (``reduce-overhead``:
        CUDA graphs): the text encoder on prompts and pseudo-tokens, and the decoder. The Python around them
        (prompt token ids, which differ from batch to batch, and the ablation switches) stays eager, so new
        prompts never recompile. Weights are untouched: the bundle saves as ever."""
        self.encode_text = torch.compile(self.encode_text, mode=mode)
        self.decode = torch.compile(self.decode, mode=mode)

    def set_encoder_training(self, layers: str) -> None:
        """Which image-encoder weights train: ``none`` (frozen, the paper), ``all``, or ``last-K`` (the last K
        layers, the final norm and the projection). A random encoder is no CLIP; training it is what lets a
        random backbone learn (docs/method.md, "Training")."""
        vision, projection = self.vision, self.clipseg.clip.visual_projection
        vision.requires_grad_(False)
        projection.requires_grad_(False)
        if layers == "all":
            modules = [vision, projection]
        elif layers.startswith("last-"):
            modules = [*vision.encoder.layers[-int(layers[5:]):], vision.post_layernorm, projection]
        else:
            modules = []
        for module in modules:
            module.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

