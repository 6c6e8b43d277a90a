"""Data: records (SPEC 1), group sampling (2), formatting (3, 4), collation (5), evaluation lists (8).

`rerank_lightning.data.matryoshka` holds the Matryoshka recipe's dataset and collator (same names
as the instruction recipe's, which this package exports).
"""

from importlib import import_module

from .candidates import CandidateList, CandidatePairs, load_beir_rerank, load_candidate_lists
from .formatting import (
    DEFAULT_PROMPT, MATRYOSHKA_PROMPT, FormatConfigError, MatryoshkaFormatter, PairFormatter, formatter_from_recipe,
)
from .records import DataFormatError, TrainRecord, load_records
from .sampling import GroupSampler, sample_group

# Imported on first use: they need Lightning or datasets, which scoring an export does not.
_LAZY = {"RerankDataModule": "datamodule", "DataArguments": "instruction", "RerankCollator": "instruction",
         "TrainDatasetForReranker": "instruction", "TokenizedRecords": "tokenized"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CandidateList", "CandidatePairs", "DEFAULT_PROMPT", "DataArguments", "DataFormatError",
    "FormatConfigError", "GroupSampler", "MATRYOSHKA_PROMPT", "MatryoshkaFormatter", "PairFormatter",
    "RerankCollator", "RerankDataModule", "TokenizedRecords", "TrainDatasetForReranker", "TrainRecord",
    "formatter_from_recipe", "load_beir_rerank", "load_candidate_lists", "load_records", "sample_group",
]
