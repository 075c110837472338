"""Hard negatives: in-batch reweighting (Robinson et al. 2021), a bank of mined negatives, NegCLIP caption swaps.

Same conventions as `mlx_clip.losses` (which re-exports these names): features arrive L2-normalized, `logit_scale` is
the multiplier (already exponentiated), losses are means over the batch.
"""

from __future__ import annotations

import math
import random
import re

import mlx.core as mx


def diagonal_cross_entropy(logits: mx.array) -> mx.array:
    """Mean over rows of -log softmax(row)[i] for row i: InfoNCE with row i's positive in column i.

    Extra columns past the square part (appended negatives) only enter the normaliser.
    """
    return mx.mean(mx.logsumexp(logits, axis=1) - mx.diagonal(logits))


@mx.custom_function
def softplus(x: mx.array) -> mx.array:
    """log(1 + e^x), accurate in value and gradient at both tails.

    `mx.logaddexp(x, 0)` has the accurate value, but in mlx 0.32 its gradient loses relative precision for x << 0
    (4e-5 at x = -8, exactly 0 at x = -20), which is where a well-fit loss lives; so the gradient is σ(x), given here.
    """
    return mx.logaddexp(x, 0.0)


@softplus.vjp
def _softplus_vjp(x, cotangent, output):
    return cotangent * mx.sigmoid(x)


# ---------------------------------------------------------------------------------------------------------------------
# In-batch reweighting of negatives (Robinson, Chuang, Sra, Jegelka: "Contrastive Learning with Hard Negative Samples")
# ---------------------------------------------------------------------------------------------------------------------


def hard_negative_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    beta: float = 1.0,
    tau_plus: float = 0.0,
) -> mx.array:
    """Symmetric InfoNCE whose negatives are reweighted towards the hard ones (HCL, Robinson et al. 2021).

    For anchor i with positive logit p = s·⟨x_i, y_i⟩ and negatives n_j = s·⟨x_i, y_j⟩ (j ≠ i, N = B - 1 of them):
        w_j = exp(β·⟨x_i, y_j⟩)                                   # q_β(x⁻) ∝ e^{β f(x)ᵀf(x⁻)}, the paper's eq. (3)
        Ng  = max( (N·Σ w_j e^{n_j} / Σ w_j - τ⁺·N·e^p) / (1 - τ⁺),  N·e^{-s} )   # clamp as in the paper
        loss_i = -log( e^p / (e^p + Ng) )
    β is applied to the cosine similarity, as in the paper (the authors' code applies it to similarity / temperature,
    i.e. their β equals this β / s). β = 0 and τ⁺ = 0 give exactly `clip_loss`. τ⁺ is the class prior used for
    debiasing (Chuang et al. 2020); the clamp keeps Ng at least its smallest possible value, N·e^{-s}.
    Computed in log space, so logit_scale = 1e4 stays finite. A batch of 1 has no negatives: loss 0, like clip_loss.
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    sims = image_features @ text_features.T
    per_image = _hcl_direction(sims, logit_scale, beta, tau_plus)
    per_text = _hcl_direction(sims.T, logit_scale, beta, tau_plus)
    return (per_image + per_text) / 2


def _hcl_direction(sims: mx.array, logit_scale: mx.array, beta: float, tau_plus: float) -> mx.array:
    n = sims.shape[0]
    logits = logit_scale * sims
    positive = mx.diagonal(logits)
    if n == 1:
        return mx.mean(positive - positive)  # no negatives: -log(e^p / e^p) = 0, kept in the graph
    log_n = math.log(n - 1)
    negative = ~mx.eye(n, dtype=mx.bool_)
    weights = beta * sims
    # log(N · Σ w e^n / Σ w): the importance-weighted negative mean, scaled back to N terms.
    log_ng = (
        log_n
        + mx.logsumexp(mx.where(negative, weights + logits, -mx.inf), axis=1)
        - mx.logsumexp(mx.where(negative, weights, -mx.inf), axis=1)
    )
    if tau_plus > 0:
        log_ng = _log_debiased(log_ng, math.log(tau_plus) + log_n + positive, tau_plus)
    log_ng = mx.maximum(log_ng, log_n - logit_scale)
    # -log(e^p / (e^p + Ng)) = softplus(log Ng - p): no cancellation when the loss is small
    return mx.mean(softplus(log_ng - positive))


def _log_debiased(log_a: mx.array, log_b: mx.array, tau_plus: float) -> mx.array:
    """log((A - B) / (1 - τ⁺)) where A > B, else -inf (the clamp then takes over). No NaN in value or gradient."""
    # exponent capped at 0 so a masked-out branch never produces inf (0 * inf would poison the gradient)
    ratio = mx.exp(mx.minimum(log_b - log_a, 0.0))
    valid = ratio < 1
    log_diff = log_a + mx.log1p(-mx.where(valid, ratio, 0.0)) - math.log(1 - tau_plus)
    return mx.where(valid, log_diff, -mx.inf)


# ---------------------------------------------------------------------------------------------------------------------
# Mined negatives from a FIFO bank of recent embeddings
# ---------------------------------------------------------------------------------------------------------------------


class NegativeBank:
    """A fixed-size FIFO of recent image and text embeddings (stop-gradient) with their ids, for `mined_negative_loss`.

    `update` overwrites the oldest rows; `image`, `text` and `ids` return the filled part, `arrays()` all `size` rows
    (unfilled ones carry the id `EMPTY`, which `mined_negative_loss` never chooses), so that a compiled step sees one
    shape from the first step on. The bank lives outside the graph: call `update` after the optimizer step (outside
    any `mx.compile`d function), with the step's normalized features and the sample ids (or class labels) used to
    keep a sample's own matches out of its negatives. `state_dict` / `load_state_dict` save and restore it exactly.
    """

    EMPTY = -1  # the id of an unfilled slot

    def __init__(self, size: int, dim: int, dtype=mx.float32):
        if size < 1:
            raise ValueError(f"bank size must be >= 1, got {size}")
        self.size = size
        self._image = mx.zeros((size, dim), dtype=dtype)
        self._text = mx.zeros((size, dim), dtype=dtype)
        self._ids = mx.full((size,), self.EMPTY, dtype=mx.int32)
        self._next = 0  # the slot the next row goes to
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def update(self, image_features: mx.array, text_features: mx.array, ids) -> None:
        ids = mx.array(ids, dtype=mx.int32)
        image, text = mx.stop_gradient(image_features), mx.stop_gradient(text_features)
        image, text, ids = image[-self.size :], text[-self.size :], ids[-self.size :]  # only the newest fit
        n = image.shape[0]
        slots = mx.array([(self._next + i) % self.size for i in range(n)])
        self._image[slots] = image.astype(self._image.dtype)
        self._text[slots] = text.astype(self._text.dtype)
        self._ids[slots] = ids
        mx.eval(self._image, self._text, self._ids)
        self._next = (self._next + n) % self.size
        self.count = min(self.count + n, self.size)

    # Slots fill in order 0, 1, ... before wrapping, so the filled part is always the first `count` rows.
    @property
    def image(self) -> mx.array:
        return self._image[: self.count]

    @property
    def text(self) -> mx.array:
        return self._text[: self.count]

    @property
    def ids(self) -> mx.array:
        return self._ids[: self.count]

    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        """(image (size, D), text (size, D), ids (size,)): every slot, unfilled ones with id EMPTY."""
        return self._image, self._text, self._ids

    def state_dict(self) -> dict[str, mx.array]:
        return {"image": self._image, "text": self._text, "ids": self._ids,
                "position": mx.array([self._next, self.count], dtype=mx.int32)}

    def load_state_dict(self, state: dict[str, mx.array]) -> None:
        if tuple(state["image"].shape) != tuple(self._image.shape):
            raise ValueError(f"saved negative bank has shape {tuple(state['image'].shape)}, this run's is "
                             f"{tuple(self._image.shape)}: resume with the same --bank-size and model")
        self._image, self._text = state["image"].astype(self._image.dtype), state["text"].astype(self._text.dtype)
        self._ids = state["ids"].astype(mx.int32)
        self._next, self.count = (int(x) for x in state["position"].tolist())


def mined_negative_loss(
    image_features: mx.array,
    text_features: mx.array,
    logit_scale: mx.array,
    bank_text: mx.array | None,
    bank_image: mx.array | None,
    k: int,
    ids=None,
    bank_ids=None,
) -> mx.array:
    """Symmetric InfoNCE where each image also sees its k most similar bank texts as negatives, and each text its k
    most similar bank images.

    Bank entries with the same id as the sample (`ids` (B,) vs `bank_ids` (M,), e.g. the same image seen in an earlier
    step, or the same class label) are never chosen, nor unfilled slots (bank id `NegativeBank.EMPTY`). Selection is
    by similarity and carries no gradient; the bank is constant, so gradients flow only into the batch features and
    logit_scale. With fewer than k eligible entries the missing slots are -inf (contribute nothing). k = 0, an empty
    bank or None gives `clip_loss`.
    """
    in_batch = logit_scale * (image_features @ text_features.T)
    per_image = _with_mined(in_batch, image_features, bank_text, logit_scale, k, ids, bank_ids)
    per_text = _with_mined(in_batch.T, text_features, bank_image, logit_scale, k, ids, bank_ids)
    return (diagonal_cross_entropy(per_image) + diagonal_cross_entropy(per_text)) / 2


def _with_mined(logits, queries, bank, logit_scale, k, ids, bank_ids) -> mx.array:
    """`logits` (B, B) with each row's k hardest eligible bank logits appended: (B, B + k)."""
    k = min(k, 0 if bank is None else bank.shape[0])
    if k <= 0:
        return logits
    bank_logits = logit_scale * (queries @ mx.stop_gradient(bank).T)  # (B, M)
    if bank_ids is not None:
        bank_ids = mx.array(bank_ids)
        excluded = (bank_ids == NegativeBank.EMPTY)[None, :]
        if ids is not None:
            excluded = excluded | (mx.array(ids)[:, None] == bank_ids[None, :])
        # mask after scaling: a -inf that was multiplied by logit_scale would give 0 * inf in its gradient
        bank_logits = mx.where(excluded, -mx.inf, bank_logits)
    hardest = mx.stop_gradient(mx.argpartition(-bank_logits, kth=k - 1, axis=1)[:, :k])
    return mx.concatenate([logits, mx.take_along_axis(bank_logits, hardest, axis=1)], axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# NegCLIP (Yuksekgonul et al. 2023): perturbed captions as extra negatives for the image
# ---------------------------------------------------------------------------------------------------------------------


def negclip_loss(
    image_features: mx.array,
    text_features: mx.array,
    neg_text_features: mx.array,
    logit_scale: mx.array,
    neg_valid=None,
) -> mx.array:
    """Symmetric InfoNCE where every image's candidates are the batch captions plus all perturbed captions (M, D).

    As in NegCLIP, the perturbed captions are only extra candidates in the image→text direction; text→image is the
    plain CLIP term. M = 0 gives `clip_loss`. `neg_valid` (M,) bool, optional: False drops that perturbed caption
    (e.g. one `perturb_captions` could not change), keeping the shapes fixed for a compiled step.
    """
    candidates = mx.concatenate([text_features, neg_text_features], axis=0)  # (B + M, D)
    per_image = logit_scale * (image_features @ candidates.T)
    if neg_valid is not None:
        keep = mx.concatenate([mx.ones((text_features.shape[0],), dtype=mx.bool_), mx.array(neg_valid)])
        per_image = mx.where(keep[None, :], per_image, -mx.inf)  # masked after scaling: no 0 * inf in the gradient
    per_text = logit_scale * (text_features @ image_features.T)
    return (diagonal_cross_entropy(per_image) + diagonal_cross_entropy(per_text)) / 2


# A small rule set in place of a tagger: domain captions are short noun phrases, and a wrong tag only makes a
# weaker negative. Adjectives are a closed list; an object is the word after a determiner or adjective.
ADJECTIVES = frozenset(
    """red orange yellow green blue purple pink brown black white gray grey silver golden dark bright pale
    small large big tiny huge tall short long wide narrow thick thin round square oval flat curved straight
    old young new wooden metal metallic plastic glass stone leather wet dry hot cold warm soft hard smooth rough
    empty full open closed clean dirty striped spotted left right upper lower inner outer front back
    benign malignant normal abnormal mild moderate severe acute chronic healthy diseased solid cystic dense""".split()
)
DETERMINERS = frozenset("a an the this that these those some two three four five several many one its their".split())
_WORD = re.compile(r"[A-Za-z0-9'-]+")
_TOKENS = re.compile(r"[A-Za-z0-9'-]+|[^A-Za-z0-9'-]+")


def perturb_captions(captions: list[str], rng: random.Random | int) -> list[str]:
    """NegCLIP-style hard-negative captions, one per input, deterministic given `rng` (a random.Random or a seed).

    Each caption gets one swap, chosen by `rng` among those that change it:
      - attribute swap: two different adjectives trade places ("a red car and a blue house" -> "a blue car and a red
        house");
      - object swap (word order): two different objects trade places ("a dog chasing a cat" -> "a cat chasing a dog");
    and, when neither applies, two neighbouring different words trade places. A caption with fewer than two
    different words comes back unchanged. Punctuation and spacing are kept.
    """
    rng = random.Random(rng) if isinstance(rng, int) else rng
    return [_perturb(caption, rng) for caption in captions]


def _perturb(caption: str, rng: random.Random) -> str:
    tokens = _TOKENS.findall(caption)
    words = [i for i, t in enumerate(tokens) if _WORD.fullmatch(t)]  # token positions of words
    lower = [tokens[i].lower() for i in words]
    adjectives = [j for j, w in enumerate(lower) if w in ADJECTIVES]
    objects = [
        j for j, w in enumerate(lower)
        if j > 0 and lower[j - 1] in ADJECTIVES | DETERMINERS and w not in ADJECTIVES | DETERMINERS
    ]
    swaps = (_distinct_pair(adjectives, lower, rng), _distinct_pair(objects, lower, rng))
    candidates = [pair for pair in swaps if pair]
    if not candidates:
        neighbours = [(j, j + 1) for j in range(len(lower) - 1) if lower[j] != lower[j + 1]]
        candidates = [rng.choice(neighbours)] if neighbours else []
    if not candidates:
        return caption
    a, b = rng.choice(candidates)
    ta, tb = words[a], words[b]
    tokens[ta], tokens[tb] = tokens[tb], tokens[ta]
    return "".join(tokens)


def _distinct_pair(positions: list[int], lower: list[str], rng: random.Random) -> tuple[int, int] | None:
    """Two of `positions` holding different words (so the swap changes the caption), or None."""
    pairs = [(a, b) for i, a in enumerate(positions) for b in positions[i + 1 :] if lower[a] != lower[b]]
    return rng.choice(pairs) if pairs else None
