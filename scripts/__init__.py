"""siam3d-radiomics bundle hooks, one sub-package per stage of the data flow:

``data`` (cohorts, datalists, ROI transforms) -> ``pretrain`` (encoder, SimSiam, RE/SE, trainer, embeddings) ->
``downstream`` (pyradiomics, SVM protocol, supervised baseline, reports); ``run`` holds the pipeline, sharding,
DDP and packaging. The modules at this level (``cli``, ``io_utils``, ``config_utils``, ``progress``, and
``feature_table``: the table + provenance sidecar + failure report that embedding, radiomics, sharding and the
evaluation exchange) are shared by all stages.

The core modules are plain PyTorch / NumPy and work without Ignite or a bundle config; the configs in
``configs/`` wire them together.
"""
