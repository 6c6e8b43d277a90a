"""Export a trained reranker and score pairs with it (SPEC 9)."""

from .export import RECIPE_FILE, export_reranker
from .reranker import Reranker

__all__ = ["RECIPE_FILE", "Reranker", "export_reranker"]
