"""Mask classification for segmentation: matching, the set loss, post-processing.

matching     matching cost (class + point BCE + point dice) and a jit-able Hungarian match.
losses       bilinear point sampling, PointRend importance points, BCE / dice, set_criterion.
postprocess  semantic / instance / panoptic inference per image, COCO-panoptic PNG + JSON.
results      one image's segmentation written as files (overlay, class masks, panoptic).
Metrics (mIoU, PQ, mask AP) are in visgen_jax.eval.segmentation.
"""
