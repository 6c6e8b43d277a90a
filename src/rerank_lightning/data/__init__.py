"""Data: records (SPEC 1), group sampling (2), formatting (3), collation (5), evaluation lists (8)."""

from .candidates import CandidateList, CandidatePairs, load_beir_rerank, load_candidate_lists
from .datamodule import RerankDataModule
from .formatting import DEFAULT_PROMPT, FormatConfigError, PairFormatter
from .instruction import DataArguments, RerankCollator, TrainDatasetForReranker
from .records import DataFormatError, TrainRecord, load_records
from .sampling import GroupSampler, sample_group

__all__ = [
    "CandidateList", "CandidatePairs", "DEFAULT_PROMPT", "DataArguments", "DataFormatError",
    "FormatConfigError", "GroupSampler", "PairFormatter", "RerankCollator", "RerankDataModule",
    "TrainDatasetForReranker", "TrainRecord", "load_beir_rerank", "load_candidate_lists",
    "load_records", "sample_group",
]
