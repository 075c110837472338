"""CLIP in MLX: a ViT image tower and a causal text transformer sharing one encoder layer.

Attribute names are the checkpoint schema and follow Hugging Face CLIP (`vision_model.encoder.layers.N.self_attn.q_proj`,
`visual_projection`, ...), so HF dirs load with layout fixes only. Images are NHWC.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_clip import cpu_streams, fastmath, fused_qkv, gpu_embedding, mlp_block, packed_attention, qkv_block, switches
from mlx_clip.layer_norm import LayerNorm
from mlx_clip.linear import Linear
from mlx_clip.config import CLIPConfig, TextConfig, VisionConfig
from mlx_clip.memory import checkpointed, sliced_attention
from mlx_clip.resolution import drop_patches, resample_position_embedding


# "gelu" is the erf GELU (open_clip's nn.GELU(), HF's "gelu"), not the tanh approximation; both are rational
# approximations to float precision that fuse into one kernel (mlx_clip.fastmath says why).
ACTIVATIONS = {"gelu": fastmath.gelu, "quick_gelu": fastmath.quick_gelu}

# The patch stem (a convolution whose stride is its kernel) as "conv" (mx.conv2d) or "matmul" (the image cut into
# patches by a reshape and a transpose, then one product with the flattened kernel: the same sums). On the CPU the
# product is faster (`small`'s stem at b32, forward + weight gradient: 2.5 -> 1.9 ms); on an H200 the two measured
# the same (ViT-B-16 103.3 / 104.3 vs 104.4 / 106.1 ms a step, +74 MiB for the cut image; both bit-reproducible run
# to run: benchmarks/results/gpu-s18-h200.md). MLXCLIP_PATCH_EMBED=conv restores the convolution.
PATCH_EMBED = switches.env_word("MLXCLIP_PATCH_EMBED", ("matmul", "conv"), "matmul")


class Attention(nn.Module):
    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = Linear(dims, dims)
        self.k_proj = Linear(dims, dims)
        self.v_proj = Linear(dims, dims)
        self.out_proj = Linear(dims, dims)
        self.chunk = 0  # > 0: attention in chunks of this many tokens, same output with less memory (mlx_clip.memory)

    def __call__(self, x: mx.array, mask=None) -> mx.array:
        return self.attend(*(p(x) for p in (self.q_proj, self.k_proj, self.v_proj)), mask)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
        """Attention of projected (B, L, D) queries, keys and values, then the output projection."""
        return self.out_proj(self.context(q, k, v, mask))

    def context(self, q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
        """Attention of projected (B, L, D) queries, keys and values, before the output projection: (B, L, D)."""
        if isinstance(mask, packed_attention.RowWindows):  # packed caption rows: key windows, T x 2s scores at most
            return packed_attention.attend(q, k, v, self.num_heads, self.scale, mask)
        if self.chunk:
            heads = (fastmath.split_heads(t, self.num_heads) for t in (q, k, v))
            return fastmath.merge_heads(sliced_attention(*heads, scale=self.scale, mask=mask, chunk=self.chunk))
        return fastmath.token_attention(q, k, v, self.num_heads, self.scale, mask)

    def pooled(self, x: mx.array, positions, mask=None) -> mx.array:
        """The attention output at the pooled positions only, (B, n, D): keys and values from every token, the query,
        attention and output projection for those positions. `positions`: an int or (B,) ints (n = 1) or (B, n) ints;
        `mask`: None, "causal" (a position sees itself and the tokens before it), packed rows' windows
        (packed_attention.RowWindows) or the tower's additive (B, 1, L, L) array, whose rows for the pooled positions
        are used."""
        q = self.q_proj(take_rows(x, positions))
        k, v = self.k_proj(x), self.v_proj(x)
        if isinstance(mask, str):
            mask = _causal_row_mask(positions, x.shape[0], x.shape[1]).astype(q.dtype)
        elif isinstance(mask, packed_attention.RowWindows):
            mask = mask.pooled_rows(positions).astype(q.dtype)
        elif mask is not None:
            rows = mx.array(positions) if isinstance(positions, int) else positions
            mask = mx.take_along_axis(mask, rows.reshape(-1, 1, q.shape[1], 1), axis=2)
        heads = (fastmath.split_heads(t, self.num_heads) for t in (q, k, v))
        return self.out_proj(fastmath.merge_heads(fastmath.attention(*heads, scale=self.scale, mask=mask)))


def take_rows(x: mx.array, positions) -> mx.array:
    """x[b, positions[b]] as (B, 1, D) for an int (the same token in every row) or (B,) ints; (B, n, D) for (B, n)."""
    if isinstance(positions, int):
        return x[:, positions : positions + 1]
    return mx.take_along_axis(x, positions.reshape(x.shape[0], -1, 1), axis=1)


def _pooled_rows(out: mx.array, positions) -> mx.array:
    """(B, n, D) rows of the pooled positions -> (B, D) where one position per row was asked for."""
    return out if not isinstance(positions, int) and positions.ndim == 2 else out[:, 0]


def _causal_row_mask(positions, batch: int, length: int) -> mx.array:
    """Additive (B, 1, n, L) mask: 0 on the keys at or before each pooled query's position, -inf after it."""
    limit = mx.broadcast_to(mx.array(positions), (batch,)) if isinstance(positions, int) else positions
    seen = mx.arange(length) <= limit[..., None]
    return mx.where(seen, 0.0, -mx.inf).reshape(batch, 1, -1, length)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.activation = ACTIVATIONS[act]
        self.fc1 = Linear(dims, hidden)
        self.fc2 = Linear(hidden, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block, shared by both towers."""

    def __init__(self, cfg: VisionConfig | TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, x: mx.array, mask=None) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        return self.rows(x.reshape(-1, x.shape[-1]), x.shape[:-1], mask).reshape(x.shape)

    def rows(self, x: mx.array, lengths: tuple, mask=None) -> mx.array:
        """The block on a batch's tokens as rows: (B·L, D) of a (B, L) = `lengths` batch -> (B·L, D). Its dense
        layers, LayerNorms and residual adds take a matrix: MLX's addmm of a (B, L, D) input reshapes it and its
        result, and the backward each again (~5 graph nodes a dense layer, which a host-bound GPU step pays per
        node); attention reads (B, L, D) views of the projections. The same products on the same numbers."""
        return self._mlp(x + self._attention(x, lengths, mask))

    def _attention(self, x: mx.array, lengths: tuple, mask=None) -> mx.array:
        attn, norm = self.self_attn, self.layer_norm1
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        if qkv_block.applies(norm, *projections):  # same numbers, LayerNorm(x) not kept for the backward pass
            q, k, v = qkv_block.qkv_block(norm, *projections, x)
        else:
            y = norm(x)
            if fused_qkv.applies(attn, y.dtype, lengths, mask):  # CUDA: one product, q, k and v read in place
                return attn.out_proj(fused_qkv.context(attn, y, lengths, mask))
            q, k, v = (p(y) for p in projections)
        out = attn.context(*(t.reshape(*lengths, t.shape[-1]) for t in (q, k, v)), mask)
        return attn.out_proj(out.reshape(x.shape[0], -1))

    def pooled(self, x: mx.array, positions, mask=None) -> mx.array:
        """The block's output at the pooled positions only, (B, D) (or (B, n, D) for (B, n) positions): what a tower's
        last block computes when only its pooled token is read (the CLS token, the text's EOT)."""
        out = self._mlp(take_rows(x, positions) + self.self_attn.pooled(self.layer_norm1(x), positions, mask))
        return _pooled_rows(out, positions)

    def _mlp(self, x: mx.array) -> mx.array:
        norm, fc1, fc2 = self.layer_norm2, self.mlp.fc1, self.mlp.fc2
        if mlp_block.applies(norm, fc1, fc2):  # same numbers, fewer activations kept for the backward pass
            return x + mlp_block.mlp_block(norm, fc1, fc2, self.mlp.activation, x)
        return x + self.mlp(norm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig | TextConfig):
        super().__init__()
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.grad_checkpoint = False  # recompute each block in the backward pass instead of keeping its activations

    def __call__(self, x: mx.array, mask=None, hidden_states: list | None = None, pool=None) -> mx.array:
        """(B, L, D) -> (B, L, D); with `pool` (an int or (B,) positions) -> (B, D), the rows at those positions
        ((B, n) positions -> (B, n, D)).

        Pooling lets the last block run its query, attention output and MLP for the pooled rows alone (keys and values
        still come from every token), which is exact and saves ~10/12 of that block's matmuls: ~7% of a 12-layer
        tower's work, forward and backward. With `hidden_states` every block's full output is kept, so no shortcut."""
        layers = self.layers
        last = layers[-1] if pool is not None and hidden_states is None and layers else None
        body = layers[:-1] if last is not None else layers
        if body:  # the blocks on rows (EncoderLayer.rows says why), shaped back once
            shape, rows = x.shape, x.reshape(-1, x.shape[-1])
            for layer in body:
                rows = (checkpointed(layer, rows, shape[:-1], mask, call=layer.rows) if self.grad_checkpoint
                        else layer.rows(rows, shape[:-1], mask))
                if hidden_states is not None:
                    hidden_states.append(rows.reshape(shape))
            x = rows.reshape(shape)
        if last is not None:
            return last.pooled(x, pool, mask)
        return x if pool is None else _pooled_rows(take_rows(x, pool), pool)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def __call__(self, images: mx.array) -> mx.array:
        x = self.patches(images)  # (B, H/p, W/p, D)
        B, grid, D = x.shape[0], x.shape[1:3], x.shape[-1]
        x = x.reshape(B, -1, D)  # (B, N, D), row-major patches as open_clip's flatten
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (B, 1, D))
        x = mx.concatenate([cls, x], axis=1)
        # Another image size: the grid of position embeddings is resampled (bicubic, traced once per size).
        return x + resample_position_embedding(self.position_embedding.weight, grid).astype(x.dtype)

    def patches(self, images: mx.array) -> mx.array:
        """The patch stem's output (B, H/p, W/p, D), by PATCH_EMBED's route."""
        conv = self.patch_embedding
        if PATCH_EMBED == "conv":
            return conv(images)
        batch, height, width, channels = images.shape
        p = conv.weight.shape[1]
        rows, cols = height // p, width // p
        if (rows * p, cols * p) != (height, width):  # the convolution drops the remainder; so does the cut
            images = images[:, : rows * p, : cols * p]
        cut = images.reshape(batch, rows, p, cols, p, channels).transpose(0, 1, 3, 2, 4, 5)
        flat = cut.reshape(batch, rows, cols, p * p * channels)  # each patch as (kh, kw, C), the kernel's order
        return flat @ conv.weight.reshape(conv.weight.shape[0], -1).T


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's name
        self.encoder = Encoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.patch_dropout = 0.0  # fraction of patch tokens dropped; set only while a training step runs

    def __call__(self, images: mx.array, hidden_states: list | None = None) -> mx.array:
        """Pooled (CLS) features after the final norm, before projection: (B, D)."""
        x = self.embeddings(images)
        if self.patch_dropout:
            x = drop_patches(x, self.patch_dropout)  # after the position embeddings, before the norm (open_clip)
        x = self.pre_layrnorm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.post_layernorm(self.encoder(x, None, hidden_states, pool=0))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        # gpu_embedding.Embedding: on CUDA the tables' gradients are summed in a fixed order (repeated ids), not by
        # atomics, so a run repeats bit for bit; elsewhere nn.Embedding's own lookup
        self.token_embedding = gpu_embedding.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = gpu_embedding.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, ids: mx.array) -> mx.array:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pool_type = cfg.pool_type
        self.eos_token_id = cfg.eos_token_id
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def __call__(self, ids: mx.array, hidden_states: list | None = None) -> mx.array:
        """Features at the EOT token after the final norm, before projection: (B, D)."""
        x = self.embeddings(ids)
        if hidden_states is not None:
            hidden_states.append(x)
        return self.pool(x, ids, hidden_states)

    def pool(self, x: mx.array, ids: mx.array, hidden_states: list | None = None) -> mx.array:
        """Embedded tokens (B, L, D) of `ids` -> the final-normed features at each row's EOT, (B, D)."""
        return self.final_layer_norm(self.encoder(x, "causal", hidden_states, pool=self._eot_positions(ids)))

    def embed_packed(self, groups: dict) -> mx.array:
        """Token plus position embeddings of packed rows (tokenizer.pack_rows), every group at once: (G, T, D). One
        lookup for all groups makes one gradient of the 49,408-row token table in the backward pass, not one per group
        plus their sum (each a pass over the whole table)."""
        return self.embeddings.token_embedding(groups["ids"]) + self.embeddings.position_embedding(groups["positions"])

    def packed(self, part: dict) -> mx.array:
        """Final-normed features at each row's EOT from one packed sequence of rows (tokenizer.pack_rows, one group:
        each array (1, T), eot (1, n), and its embeddings "embedded" (1, T, D): `embed_packed`) -> (n, D). Each token
        attends to its own row's tokens up to itself."""
        seg, eot, x = part["segments"], part["eot"], part["embedded"]
        if "window" in part:  # every row short enough for key windows (packed_attention)
            mask = packed_attention.RowWindows(part["window"], seg)
        else:  # own row, up to itself: (1, 1, T, T)
            mask = packed_attention.row_mask(seg, mx.arange(seg.shape[-1])[None]).astype(x.dtype)
        out = self.encoder(x, mask, pool=eot)  # (1, n, D)
        return self.final_layer_norm(out[0])

    def eot_positions(self, ids) -> mx.array:
        """Each row's pooled (EOT) position, (B,)."""
        return self._eot_positions(mx.array(ids))

    def _eot_positions(self, ids: mx.array) -> mx.array:
        if self.pool_type == "argmax":  # EOT is the largest id in CLIP's vocab
            return mx.argmax(ids, axis=-1)
        return mx.argmax((ids == self.eos_token_id).astype(mx.int32), axis=-1)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        v, t = config.vision_config, config.text_config
        self.vision_model = VisionTransformer(v)
        self.text_model = TextTransformer(t)
        self.visual_projection = Linear(v.hidden_size, config.projection_dim, bias=v.projection_bias)
        self.text_projection = Linear(t.hidden_size, config.projection_dim, bias=t.projection_bias)
        self.logit_scale = mx.array(config.logit_scale_init_value, dtype=mx.float32)  # log of the multiplier
        if config.logit_bias_init_value is not None:
            self.logit_bias = mx.array(config.logit_bias_init_value, dtype=mx.float32)

    def encode_image(self, images: mx.array, normalize: bool = False) -> mx.array:
        """images: (B, H, W, 3) normalized pixels -> (B, projection_dim)."""
        x = cpu_streams.split_batch(lambda part: self.visual_projection(self.vision_model(part)), images)
        return _l2_normalize(x) if normalize else x

    def encode_text(self, ids, normalize: bool = False) -> mx.array:
        """ids: (B, L) int token ids, or those rows packed (tokenizer.pack_rows, as mx arrays) -> (B, projection_dim)."""
        if isinstance(ids, dict):  # one packed group per CPU stream in batch-parallel mode, then the rows' order
            groups = {k: v for k, v in ids.items() if k != "rows"}
            groups["embedded"] = self.text_model.embed_packed(groups)
            x = cpu_streams.split_groups(lambda part: self.text_projection(self.text_model.packed(part)), groups)
            x = mx.take(x, ids["rows"], axis=0)
        else:
            x = cpu_streams.split_batch(lambda part: self.text_projection(self.text_model(part)), ids)
        return _l2_normalize(x) if normalize else x

    def __call__(self, images: mx.array, ids: mx.array) -> tuple[mx.array, mx.array]:
        """(logits_per_image (B_img, B_txt), logits_per_text (B_txt, B_img)), scaled by exp(logit_scale)."""
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(ids, normalize=True)
        logits_per_image = mx.exp(self.logit_scale) * image_features @ text_features.T
        return logits_per_image, logits_per_image.T

    def sanitize(self, weights: dict) -> dict:
        """Bring checkpoint arrays (HF names, either conv layout) to this model's layout. Idempotent."""
        out = {}
        channels = self.config.vision_config.num_channels
        for key, value in weights.items():
            if key.endswith("position_ids"):  # a buffer in older HF checkpoints, not a parameter
                continue
            if key == "vision_model.embeddings.patch_embedding.weight" and _is_oihw(value.shape, channels):
                value = value.transpose(0, 2, 3, 1)  # torch OIHW -> MLX OHWI
            if key in ("logit_scale", "logit_bias"):
                value = value.reshape(())
            out[key] = value
        return out


def _is_oihw(shape, channels: int) -> bool:
    # Torch conv weights are (O, C, kh, kw), MLX (O, kh, kw, C); the channel axis tells them apart
    # (ambiguous only for a patch size equal to the channel count, which no CLIP uses).
    return len(shape) == 4 and shape[1] == channels and shape[3] != channels


def _l2_normalize(x: mx.array) -> mx.array:
    return x * mx.rsqrt(mx.maximum(mx.sum(x * x, axis=-1, keepdims=True), 1e-24))


def init_weights(model: CLIP, seed: int = 0) -> CLIP:
    """CLIP's initialisation (as open_clip's init_parameters), seeded; for `mlxclip init` and pretraining from scratch."""
    key = mx.random.key(seed)
    params = []
    for name, p in nn.utils.tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        params.append((name, _init_value(name, p, model.config, sub)))
    model.update(nn.utils.tree_unflatten(params))
    return model


def _init_value(name: str, p: mx.array, cfg: CLIPConfig, key) -> mx.array:
    if name == "logit_scale":
        return mx.array(cfg.logit_scale_init_value, dtype=p.dtype)
    if name == "logit_bias":
        return mx.array(cfg.logit_bias_init_value, dtype=p.dtype)
    if "layer_norm" in name or "layernorm" in name or "layrnorm" in name:
        return mx.ones_like(p) if name.endswith("weight") else mx.zeros_like(p)
    if name.endswith("bias"):
        return mx.zeros_like(p)
    tower = cfg.vision_config if name.startswith("vision") or name.startswith("visual") else cfg.text_config
    width, layers = tower.hidden_size, tower.num_hidden_layers
    if "token_embedding" in name:
        std = 0.02
    elif "position_embedding" in name:
        std = 0.01 if tower is cfg.text_config else width**-0.5
    elif "class_embedding" in name or "patch_embedding" in name or name.endswith("projection.weight"):
        std = width**-0.5
    elif "out_proj" in name or "fc2" in name:
        std = width**-0.5 * (2 * layers) ** -0.5  # residual-branch outputs, scaled by depth
    elif "fc1" in name:
        std = (2 * width) ** -0.5
    else:  # q/k/v
        std = width**-0.5
    return (std * mx.random.normal(p.shape, key=key)).astype(p.dtype)


def num_parameters(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for _, p in nn.utils.tree_flatten(model.parameters()))
