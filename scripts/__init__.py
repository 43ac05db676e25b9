"""siam3d-radiomics bundle hooks: networks, losses, RE/SE balancing, transforms, radiomics, evaluation.

The core modules are plain PyTorch / NumPy and work without Ignite or a bundle config; the configs in
``configs/`` wire them together.
"""
