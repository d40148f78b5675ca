"""Random-feature scorers for task-agnostic and class-incremental prediction (``'ranpac'``, ``'ncm'``).

    model.compute_task_statistics('flowers', train_data, scorer='ranpac')   # statistics, never images
    pred = model.predict_task_agnostic(x, scorer='ranpac')                  # task (and class with the task's head)
    pred = model.predict_classes(x)                                         # one label space over all tasks' classes

**Features.** Each image's pre-logits features ``f`` of the frozen, unmodulated backbone (the ``base`` task) are
L2-normalised and sent through a fixed random projection followed by a ReLU, ``h = relu(W^T f / |f|)`` with ``W``
``(D, M)`` standard normal drawn from ``torch.Generator().manual_seed(seed)`` on the CPU: every process and every task
with the same ``seed`` and size ``M`` uses the same projection (RanPAC, McDonnell et al., NeurIPS 2023).
``layers=`` (``compute_task_statistics(..., layers=[4, 5])``, stored as ``ranpac_layers``) makes ``f`` from earlier
layers instead: each layer's output globally average-pooled and L2-normalised, concatenated (``base_features``); a
set without the pre-logits layer (-1) stops the base forward after its deepest layer, so scoring costs less than a
full forward. ``input_size=S`` (``compute_task_statistics(..., input_size=112)``, stored as ``ranpac_input_size``)
makes ``f`` from a downscaled copy of each batch (shorter side resized to ``S`` px, bilinear with antialiasing,
``scaled_input``): the base forward then costs about ``(S / H)^2`` of a full-size one, for statistics and scoring alike.

**Statistics per task** (``stats.ranpac_*`` tensors in the task's adapter file): ``ranpac_gram``, the upper triangle
(row-major, ``M (M + 1) / 2`` values) of the mean outer product ``H^T H / n`` of the task's random features;
``ranpac_mean``, the ``(C, M)`` class means of ``h``; ``ranpac_count``, the ``(C,)`` class counts; ``ranpac_seed``,
the projection seed (an integer below 256, exact in every float dtype); ``ranpac_ridge``, the relative ridge
regulariser. They are accumulated in float64 and stored as means, so the values stay near 1 and a float16 adapter
does not overflow. Sums are recovered as ``mean * count``: statistics of the same task from several shards or
processes merge exactly (``merge_ranpac_statistics``, ``all_reduce=True``), and the statistics of tasks learned in
separate processes combine at prediction time by summing, whatever process computed them.

**Decoding.** For a set of candidate tasks, ``G = sum_t n_t G_t`` and ``Q = [S_1 ... S_T]`` (the class sums of all
candidate tasks, one column per class) give the ridge classifier ``B = (G + lambda I)^-1 Q`` over the union of their
classes, ``lambda = ridge * trace(G) / M`` (``ridge``: the geometric mean of the candidates' ``ranpac_ridge``).
The class scores are ``h B``; a task's score is its best class score; the class-incremental prediction is the best
class over all tasks. ``'ncm'`` (nearest class mean) scores classes by the cosine similarity of ``h`` to each class
mean instead. The decoded weights are cached per model and candidate set, on the model's device in float32 (float64
for a float64 model; ``score_dtype``), and recomputed only when a task's statistics change (keyed on each statistics
tensor's identity and in-place version) or the model moves (``cache_info`` counts hits and misses).

Cost of a prediction: one forward of the base task for all candidate tasks together (truncated with ``layers``, on a
downscaled copy with ``input_size``), one ``(N, D) x (D, M)`` and one ``(N, M) x (M, C)`` product (plus, in
``predict_task_agnostic``, one grouped forward for the chosen tasks' heads, or one forward per candidate with
``head_weight > 0``).
"""

from .features import (
    BASE_SCORERS, DEFAULT_RANPAC_DIM, DEFAULT_RANPAC_LAYERS, DEFAULT_RANPAC_RIDGE, DEFAULT_RANPAC_SEED, PRE_LOGITS,
    RANPAC_OPTIONAL_STATS, RANPAC_STATS, RIDGE_GRID, base_features, cache_info, check_all_reduce, check_feature_model,
    check_input_size, check_layers, count_cache, for_each_base_feature, pre_logit_features, random_features,
    scaled_input, score_dtype,
)
from .statistics import (
    ClassMoments, check_features_and_labels, compute_ranpac_statistics, has_ranpac, input_size_of, layers_of,
    merge_ranpac_statistics, ranpac_statistics,
)
from .decoding import check_candidates, decoded, score, score_ranpac
from .classes import ClassPrediction, predict_classes, select_ridge

__all__ = [
    'select_ridge', 'RIDGE_GRID', 'BASE_SCORERS', 'RANPAC_STATS', 'DEFAULT_RANPAC_DIM', 'DEFAULT_RANPAC_RIDGE', 'DEFAULT_RANPAC_SEED',
    'ClassPrediction', 'random_features', 'ranpac_statistics', 'merge_ranpac_statistics', 'has_ranpac',
    'score_ranpac', 'compute_ranpac_statistics', 'predict_classes', 'PRE_LOGITS', 'base_features', 'cache_info',
    'score_dtype', 'scaled_input', 'check_input_size',
]
