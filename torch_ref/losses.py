"""Torch reference for `mlx_clip.losses`, same names and arguments.

open_clip's `ClipLoss` and `SigLipLoss` are used as they are; the others are written from the papers' formulas in the
most direct torch form (probability targets for cross-entropy, explicit exponentials as in the HCL authors' code),
so the MLX side and this side share no code path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss


def clip_loss(image_features, text_features, logit_scale):
    return ClipLoss()(image_features, text_features, logit_scale)


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    return SigLipLoss()(image_features, text_features, logit_scale, logit_bias)


def multi_positive_loss(image_features, text_features, logit_scale, labels):
    """Cross-entropy against soft targets: uniform over the samples that share the anchor's label."""
    labels = torch.as_tensor(labels)
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(image_features.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets.T)) / 2


def hard_negative_loss(image_features, text_features, logit_scale, beta=1.0, tau_plus=0.0):
    """HCL (Robinson et al. 2021), eq. (5) with the authors' clamp, applied image→text and text→image."""

    def one_direction(anchors, others):
        sim = anchors @ others.T
        n = sim.shape[0]
        if n == 1:
            return (logit_scale * sim * 0).sum()  # no negatives: -log(pos / pos) = 0
        big_n = n - 1
        logits = logit_scale * sim
        shift = logits.detach().max(dim=1, keepdim=True).values  # common factor e^{-shift}: cancels in pos/(pos+Ng)
        e = torch.exp(logits - shift)
        pos = e.diagonal()
        off = ~torch.eye(n, dtype=torch.bool)
        neg = e[off].view(n, big_n)
        imp = torch.exp(beta * sim[off].view(n, big_n))  # q_beta(x-) ∝ exp(beta · f(x)ᵀf(x-))
        reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
        ng = (-tau_plus * big_n * pos + reweight_neg) / (1 - tau_plus)
        floor = big_n * torch.exp(-logit_scale - shift.squeeze(1))  # N·e^{-1/t}, in the same shifted units
        ng = torch.maximum(ng, floor)
        return torch.log1p(ng / pos).mean()  # = -log(pos / (pos + ng)), without rounding pos + ng

    return (one_direction(image_features, text_features) + one_direction(text_features, image_features)) / 2


def mined_negative_loss(image_features, text_features, logit_scale, bank_text, bank_image, k, ids=None, bank_ids=None):
    """Cross-entropy over the batch plus the top-k most similar eligible bank entries (different id) per sample."""

    def one_direction(anchors, others, bank):
        logits = logit_scale * anchors @ others.T
        if bank is None or k == 0 or bank.shape[0] == 0:
            return F.cross_entropy(logits, torch.arange(len(anchors)))
        bank_logits = logit_scale * anchors @ bank.detach().T
        if ids is not None:
            same = torch.as_tensor(ids).view(-1, 1) == torch.as_tensor(bank_ids).view(1, -1)
            bank_logits = bank_logits.masked_fill(same, float("-inf"))
        top = torch.topk(bank_logits, min(k, bank.shape[0]), dim=1).values
        return F.cross_entropy(torch.cat([logits, top], dim=1), torch.arange(len(anchors)))

    return (one_direction(image_features, text_features, bank_text)
            + one_direction(text_features, image_features, bank_image)) / 2


def negclip_loss(image_features, text_features, neg_text_features, logit_scale):
    """NegCLIP: the hard-negative captions join the texts each image is classified over; text→image as in CLIP."""
    labels = torch.arange(len(image_features))
    all_texts = torch.cat([text_features, neg_text_features])
    image_term = F.cross_entropy(logit_scale * image_features @ all_texts.T, labels)
    text_term = F.cross_entropy(logit_scale * text_features @ image_features.T, labels)
    return (image_term + text_term) / 2


def multiscale_loss(image_features_per_view, text_features, logit_scale, weights=None, base="clip",
                    logit_bias=None, labels=None):
    weights = [1.0] * len(image_features_per_view) if weights is None else list(weights)
    fn = {"clip": clip_loss, "siglip": siglip_loss, "multi_positive": multi_positive_loss}[base]
    extra = {"siglip": (logit_bias,), "multi_positive": (labels,)}.get(base, ())
    total = sum(w * fn(v, text_features, logit_scale, *extra) for w, v in zip(weights, image_features_per_view))
    return total / sum(weights)
