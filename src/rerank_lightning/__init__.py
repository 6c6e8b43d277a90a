"""rerank-lightning: fine-tune Hugging Face causal LMs into rerankers with Lightning and Hydra."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import rerank_lightning.data` does not pull in transformers' model code.
    if name == "Reranker":
        from .inference import Reranker

        return Reranker
    raise AttributeError(name)


__all__ = ["Reranker", "__version__"]
