"""Mask2Former (ResNet backbone) in Flax linen, NHWC: MaskCLIP's class-agnostic mask proposal network.

images [B, H, W, 3] RGB 0–255 (H, W multiples of 32) → the backbone's res2–res5 (strides
4–32) → the pixel decoder (a multi-scale deformable-attention encoder over res3–res5,
then an FPN step to res2: 1/4-resolution mask features) → the masked-attention
transformer decoder (queries cycling over 1/32, 1/16, 1/8) → a list of (class_logits
[B, Q, num_classes + 1], mask_logits [B, Q, H/4, W/4]), the initial queries' prediction
first, the final one last (the `outputs` of visgen_jax.segmentation.losses.set_criterion).

Parameter names follow detectron2's Mask2Former (`sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`) so a checkpoint converts mechanically: drop `sem_seg_head.`,
turn `.N` (an index) into `_N` and the other dots into `/`; leaves: Linear/Conv
`weight` → `kernel` (transposed to [in, out] / HWIO), norm `weight` → `scale`,
`bias` → `bias`, `running_mean`/`running_var` → `mean`/`var`, nn.Embedding `weight` →
`embedding`; and two exceptions:
- nn.MultiheadAttention's `in_proj_weight`/`in_proj_bias` split in thirds into the Dense
  layers `q_proj`, `k_proj`, `v_proj` (`out_proj` as it is);
- `pixel_decoder.transformer.level_embed` (an nn.Parameter) → `pixel_decoder/transformer/level_embed`.
E.g. `pixel_decoder.input_proj.0.1.weight` → `pixel_decoder/input_proj_0_1/scale`,
`pixel_decoder.adapter_1.norm.bias` → `pixel_decoder/adapter_1/norm/bias`,
`predictor.transformer_ffn_layers.3.linear1.weight` → `predictor/transformer_ffn_layers_3/linear1/kernel`,
`predictor.mask_embed.layers.2.bias` → `predictor/mask_embed/layers_2/bias`.
detectron2's predictor `input_proj.N` are empty (256-channel features need none) and
have no parameters. The backbone has torchvision's names (visgen_jax.models.resnet:
conv1, bn1, layer1_0/conv1 ..., downsample_0/1), its norms frozen (resnet.FROZEN_NORMS);
detectron2's `backbone.stem.conv1[.norm]` is conv1/bn1, `backbone.resK.N.convM[.norm]` is
layer{K-1}_N/convM (bnM), `shortcut[.norm]` is downsample_0 (downsample_1).

MaskCLIP's released proposal network (mlpc-ucsd/MaskCLIP, mask_proposal_network.pth) has no
class head: its decoder leaves `class_embed` out and its inference feeds all Q final masks to
MaskCLIP. Its checkpoint has no `predictor.class_embed.*`; with those weights the class logits
(an untrained head) mean nothing, and proposals are all queries' masks.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from visgen_jax.models.resnet import ResNet
from visgen_jax.nn.attention import dot_product_attention
from visgen_jax.nn.layers import GroupNorm32, dense

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_LEVELS = ('res5', 'res4', 'res3')  # the deformable encoder's and the decoder's scales, coarse first
_LAYER_NORM = dict(epsilon=1e-5)  # torch's LayerNorm
# detectron2's c2_xavier_fill (kaiming_uniform with a=1) for the pixel decoder's convs.
_C2_XAVIER = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
_XAVIER = nn.initializers.xavier_uniform()


def grid_sample(values, grid):
  """torch.nn.functional.grid_sample(values, grid, mode='bilinear', padding_mode='zeros',
  align_corners=False), channels last.

  values [N, H, W, C]; grid [N, P, 2] of (x, y), −1 and 1 the outer edges of the border
  pixels → [N, P, C]. Samples outside read zeros. A gather of the four neighbours,
  differentiable in values and grid.
  """
  n, h, w, c = values.shape
  x = ((grid[..., 0] + 1) * w - 1) / 2
  y = ((grid[..., 1] + 1) * h - 1) / 2
  x0, y0 = jnp.floor(x), jnp.floor(y)
  flat = values.reshape(n, h * w, c)
  out = jnp.zeros((n, grid.shape[1], c), values.dtype)
  for xi in (x0, x0 + 1):
    for yi in (y0, y0 + 1):
      weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      index = jnp.clip(yi, 0, h - 1).astype(jnp.int32) * w + jnp.clip(xi, 0, w - 1).astype(jnp.int32)
      gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
      out = out + gathered * jnp.where(inside, weight, 0)[..., None]
  return out


def multi_scale_deformable_attention(value, shapes, locations, weights):
  """Deformable DETR's attention core: each query's heads read bilinear samples of every level.

  value: [B, S, heads, D], the levels' [h, w] maps flattened row-major one after another.
  shapes: the levels' (h, w).
  locations: [B, Q, heads, levels, points, 2] sampling points (x, y) in [0, 1] of each level.
  weights: [B, Q, heads, levels, points] attention weights.
  Returns [B, Q, heads·D].
  """
  b, _, heads, d = value.shape
  q, points = locations.shape[1], locations.shape[4]
  out = 0
  start = 0
  for level, (h, w) in enumerate(shapes):
    level_value = value[:, start:start + h * w].transpose(0, 2, 1, 3).reshape(b * heads, h, w, d)
    grid = (2 * locations[:, :, :, level] - 1).transpose(0, 2, 1, 3, 4).reshape(b * heads, q * points, 2)
    sampled = grid_sample(level_value, grid).reshape(b, heads, q, points, d)
    out = out + jnp.einsum('bhqpd,bqhp->bqhd', sampled, weights[:, :, :, level])
    start += h * w
  return out.reshape(b, q, heads * d)


def sine_position_embedding(h: int, w: int, dim: int) -> np.ndarray:
  """DETR's normalised sine embedding [h·w, dim] (row-major): y features then x features,
  positions 1..n scaled to (0, 2π], temperature 10000."""
  half = dim // 2
  scale, eps = np.float32(2 * math.pi), np.float32(1e-6)
  rates = np.float32(10000) ** (2 * (np.arange(half) // 2) / np.float32(half)).astype(np.float32)

  def embed(n):
    pos = np.arange(1, n + 1, dtype=np.float32) / (np.float32(n) + eps) * scale
    angles = pos[:, None] / rates
    return np.stack([np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=2).reshape(n, half)

  y, x = embed(h), embed(w)
  grid = np.concatenate([np.broadcast_to(y[:, None], (h, w, half)), np.broadcast_to(x[None], (h, w, half))], -1)
  return grid.reshape(h * w, dim).astype(np.float32)


def resize_bilinear(x, hw):
  """F.interpolate(mode='bilinear', align_corners=False) of [..., h, w] maps: no antialiasing."""
  return jax.image.resize(x, (*x.shape[:-2], *hw), 'linear', antialias=False)


def _offset_star(heads: int, levels: int, points: int):
  """Deformable DETR's start for the sampling offsets' bias: head h looks along direction
  2πh/heads (scaled onto the unit square's border), its points at 1, 2, ... level pixels."""
  def init(key, shape, dtype=jnp.float32):
    del key  # deterministic
    angles = np.arange(heads, dtype=np.float32) * np.float32(2 * math.pi / heads)
    directions = np.stack([np.cos(angles), np.sin(angles)], -1)
    directions /= np.abs(directions).max(-1, keepdims=True)
    star = directions[:, None, None] * np.arange(1, points + 1, dtype=np.float32)[:, None]
    return jnp.asarray(np.broadcast_to(star, (heads, levels, points, 2)).reshape(shape), dtype)
  return init


class DeformableAttention(nn.Module):
  """MSDeformAttn: queries sample `points` offsets around their reference point on every level."""
  num_heads: int
  points: int

  @nn.compact
  def __call__(self, query, reference, memory, shapes):
    """query [B, Q, C]; reference [Q, 2] (x, y) in [0, 1]; memory [B, S, C] over `shapes`."""
    b, q, c = query.shape
    levels, heads, points = len(shapes), self.num_heads, self.points
    offsets = nn.Dense(heads * levels * points * 2, kernel_init=nn.initializers.zeros,
                       bias_init=_offset_star(heads, levels, points), name='sampling_offsets')(query)
    offsets = offsets.reshape(b, q, heads, levels, points, 2)
    weights = dense(heads * levels * points, zero_init=True, name='attention_weights')(query)
    weights = jax.nn.softmax(weights.reshape(b, q, heads, levels * points), axis=-1)
    weights = weights.reshape(b, q, heads, levels, points)
    value = nn.Dense(c, kernel_init=_XAVIER, name='value_proj')(memory).reshape(b, -1, heads, c // heads)
    normaliser = jnp.asarray([(w, h) for h, w in shapes], jnp.float32)[:, None]  # offsets are in level pixels
    locations = reference[None, :, None, None, None] + offsets / normaliser
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    return nn.Dense(c, kernel_init=_XAVIER, name='output_proj')(out)


class DeformableEncoderLayer(nn.Module):
  num_heads: int
  points: int
  ffn_dim: int

  @nn.compact
  def __call__(self, x, pos, reference, shapes):
    attended = DeformableAttention(self.num_heads, self.points, name='self_attn')(x + pos, reference, x, shapes)
    x = nn.LayerNorm(**_LAYER_NORM, name='norm1')(x + attended)
    h = dense(x.shape[-1], name='linear2')(nn.relu(dense(self.ffn_dim, name='linear1')(x)))
    return nn.LayerNorm(**_LAYER_NORM, name='norm2')(x + h)


class DeformableEncoder(nn.Module):
  layers: int
  num_heads: int
  points: int
  ffn_dim: int

  @nn.compact
  def __call__(self, x, pos, reference, shapes):
    for i in range(self.layers):
      layer = DeformableEncoderLayer(self.num_heads, self.points, self.ffn_dim, name=f'layers_{i}')
      x = layer(x, pos, reference, shapes)
    return x


class DeformableTransformer(nn.Module):
  """The encoder over the flattened levels, with sine + level position embeddings."""
  layers: int
  num_heads: int
  points: int
  ffn_dim: int

  @nn.compact
  def __call__(self, levels):
    """levels: [B, h, w, C] maps → the same maps, encoded."""
    c = levels[0].shape[-1]
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (len(levels), c))
    shapes = [x.shape[1:3] for x in levels]
    pos = jnp.concatenate([sine_position_embedding(h, w, c) + level_embed[i] for i, (h, w) in enumerate(shapes)])
    # Each position's reference point is its own pixel centre, the same on every level.
    reference = np.concatenate([
        np.stack(np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h), -1).reshape(-1, 2)
        for h, w in shapes]).astype(np.float32)
    memory = jnp.concatenate([x.reshape(x.shape[0], -1, c) for x in levels], axis=1)
    memory = DeformableEncoder(self.layers, self.num_heads, self.points, self.ffn_dim, name='encoder')(
        memory, pos, reference, shapes)
    sizes = np.cumsum([h * w for h, w in shapes])[:-1]
    return [m.reshape(x.shape) for m, x in zip(jnp.split(memory, sizes, axis=1), levels)]


class NormedConv(nn.Module):
  """detectron2's Conv2d with a norm (no bias): `kernel`, then GroupNorm(32) named `norm`."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', _C2_XAVIER, (k, k, x.shape[-1], self.features))
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return GroupNorm32(name='norm')(y)


class PixelDecoder(nn.Module):
  """MSDeformAttnPixelDecoder: (mask features [B, H/4, W/4, mask_dim], [res5, res4, res3] encoded)."""
  hidden_dim: int
  mask_dim: int
  num_heads: int
  layers: int
  ffn_dim: int
  points: int

  @nn.compact
  def __call__(self, features):
    conv1x1 = lambda features, name: nn.Conv(features, (1, 1), kernel_init=_C2_XAVIER, name=name)
    levels = [GroupNorm32(name=f'input_proj_{i}_1')(conv1x1(self.hidden_dim, f'input_proj_{i}_0')(features[k]))
              for i, k in enumerate(ENCODER_LEVELS)]
    encoded = DeformableTransformer(self.layers, self.num_heads, self.points, self.ffn_dim, name='transformer')(levels)
    # FPN step to res2; detectron2 upsamples bilinearly despite FPN's "nearest".
    lateral = NormedConv(self.hidden_dim, 1, name='adapter_1')(features['res2'])
    coarse = jnp.moveaxis(resize_bilinear(jnp.moveaxis(encoded[-1], -1, 1), lateral.shape[1:3]), 1, -1)
    fine = nn.relu(NormedConv(self.hidden_dim, 3, name='layer_1')(lateral + coarse))
    return conv1x1(self.mask_dim, 'mask_features')(fine), encoded


class Attention(nn.Module):
  """torch's nn.MultiheadAttention with its in_proj split into q/k/v; `attend` [B, Q, K] True = may attend."""
  num_heads: int

  @nn.compact
  def __call__(self, query, key, value, attend=None):
    c = query.shape[-1]
    heads = lambda x, name: dense(c, name=name)(x).reshape(*x.shape[:2], self.num_heads, c // self.num_heads)
    mask = None if attend is None else attend[:, None]
    out = dot_product_attention(heads(query, 'q_proj'), heads(key, 'k_proj'), heads(value, 'v_proj'), mask=mask)
    return dense(c, name='out_proj')(out.reshape(query.shape))


class AttentionLayer(nn.Module):
  """Post-norm attention block: self-attention (memory None) or cross-attention to memory."""
  num_heads: int
  attention_name: str

  @nn.compact
  def __call__(self, x, query_pos, memory=None, pos=None, attend=None):
    attention = Attention(self.num_heads, name=self.attention_name)
    if memory is None:
      h = attention(x + query_pos, x + query_pos, x)
    else:
      h = attention(x + query_pos, memory + pos, memory, attend)
    return nn.LayerNorm(**_LAYER_NORM, name='norm')(x + h)


class FFNLayer(nn.Module):
  ffn_dim: int

  @nn.compact
  def __call__(self, x):
    h = dense(x.shape[-1], name='linear2')(nn.relu(dense(self.ffn_dim, name='linear1')(x)))
    return nn.LayerNorm(**_LAYER_NORM, name='norm')(x + h)


class MLP(nn.Module):
  """Dense layers with ReLU between them, named layers_0 ... (detectron2's MLP)."""
  features: tuple[int, ...]

  @nn.compact
  def __call__(self, x):
    for i, features in enumerate(self.features):
      x = dense(features, name=f'layers_{i}')(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


class MaskedAttentionDecoder(nn.Module):
  """MultiScaleMaskedTransformerDecoder: the list of (class_logits, mask_logits) predictions."""
  num_classes: int
  num_queries: int
  hidden_dim: int
  mask_dim: int
  num_heads: int
  ffn_dim: int
  layers: int

  @nn.compact
  def __call__(self, levels, mask_features):
    """levels: [B, h, w, hidden_dim] maps (1/32, 1/16, 1/8); mask_features [B, H/4, W/4, mask_dim]."""
    b, c = mask_features.shape[0], self.hidden_dim
    level_embed = nn.Embed(len(levels), c, name='level_embed').embedding
    memories = [x.reshape(b, -1, c) + level_embed[i] for i, x in enumerate(levels)]
    positions = [sine_position_embedding(*x.shape[1:3], c) for x in levels]
    sizes = [x.shape[1:3] for x in levels]
    query_pos = jnp.broadcast_to(nn.Embed(self.num_queries, c, name='query_embed').embedding, (b, self.num_queries, c))
    x = jnp.broadcast_to(nn.Embed(self.num_queries, c, name='query_feat').embedding, (b, self.num_queries, c))
    decoder_norm = nn.LayerNorm(**_LAYER_NORM, name='decoder_norm')
    class_embed = dense(self.num_classes + 1, name='class_embed')
    mask_embed = MLP((c, c, self.mask_dim), name='mask_embed')

    def predict(x, size):
      """The prediction from queries x and where each query may attend at the next level."""
      h = decoder_norm(x)
      masks = jnp.einsum('bqc,bhwc->bqhw', mask_embed(h), mask_features)
      attend = (jax.nn.sigmoid(resize_bilinear(masks, size)) >= 0.5).reshape(b, self.num_queries, -1)
      attend = attend | ~attend.any(axis=-1, keepdims=True)  # a query whose mask is empty attends everywhere
      return (class_embed(h), masks), jax.lax.stop_gradient(attend)

    prediction, attend = predict(x, sizes[0])
    predictions = [prediction]
    for i in range(self.layers):
      level = i % len(levels)
      x = AttentionLayer(self.num_heads, 'multihead_attn', name=f'transformer_cross_attention_layers_{i}')(
          x, query_pos, memories[level], positions[level], attend)
      x = AttentionLayer(self.num_heads, 'self_attn', name=f'transformer_self_attention_layers_{i}')(x, query_pos)
      x = FFNLayer(self.ffn_dim, name=f'transformer_ffn_layers_{i}')(x)
      prediction, attend = predict(x, sizes[(i + 1) % len(levels)])
      predictions.append(prediction)
    return predictions


class Mask2Former(nn.Module):
  """images [B, H, W, 3] RGB 0–255 → [(class_logits [B, Q, num_classes + 1], mask_logits
  [B, Q, H/4, W/4])] × (dec_layers + 1), final last; class num_classes is "no object"."""
  num_classes: int = 1
  num_queries: int = 100
  hidden_dim: int = 256
  mask_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dec_layers: int = 9
  enc_layers: int = 6
  enc_ffn_dim: int = 1024
  enc_points: int = 4
  backbone_depth: int = 50
  backbone_width: int = 64

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'Mask2Former takes [B, H, W, 3] RGB images with H and W multiples of 32; got shape '
                      f'{tuple(images.shape)} (pad the images).')
    x = (images.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)
    features = ResNet(None, self.backbone_depth, self.backbone_width, norm='frozen', name='backbone')(x, train)
    mask_features, levels = PixelDecoder(self.hidden_dim, self.mask_dim, self.num_heads, self.enc_layers,
                                         self.enc_ffn_dim, self.enc_points, name='pixel_decoder')(features)
    return MaskedAttentionDecoder(self.num_classes, self.num_queries, self.hidden_dim, self.mask_dim, self.num_heads,
                                  self.ffn_dim, self.dec_layers, name='predictor')(levels, mask_features)
