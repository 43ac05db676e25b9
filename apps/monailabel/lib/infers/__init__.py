from .embedding import EmbeddingInferTask

__all__ = ["EmbeddingInferTask"]
