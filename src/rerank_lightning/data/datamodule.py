"""`RerankDataModule`: training groups and validation candidate lists for Lightning."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Sequence

import lightning as L
from torch.utils.data import DataLoader

from . import instruction, matryoshka
from .candidates import CandidatePairs, collate_candidates, load_beir_rerank, load_candidate_lists
from .formatting import FormatConfigError
from .packing import PACKED_LENGTH
from .sampling import GroupSampler
from .tokenized import default_cache_dir

log = logging.getLogger(__name__)
RECIPES = {"instruction": instruction, "matryoshka": matryoshka}  # each: DataArguments, dataset, collator


class RerankDataModule(L.LightningDataModule):
    """Owns loading, group sampling and collation; `batch_size` counts queries (groups) per device.

    `recipe` picks the formatter, dataset and collator: `instruction` (SPEC 3) or `matryoshka` (SPEC 4).
    `prompt` / `padding_side` None: the recipe's default (padding: left for instruction, right for
    matryoshka); `cache_dir=None` keeps pre-tokenised records in memory only. `packing` packs the pairs
    of a batch into rows of at most `packed_length` tokens, each group's common prefix (the query) held once
    per row unless `share_query_prefix` is false (`packing.py`).
    """

    def __init__(
        self,
        tokenizer: Any,
        train_data: str | Sequence[str],
        val_data: str | None = None,
        val_beir: dict[str, Any] | None = None,
        train_group_size: int = 8,
        query_max_len: int = 32,
        passage_max_len: int = 128,
        query_instruction: str = "A: ",
        passage_instruction: str = "B: ",
        prompt: str | None = None,
        max_example_num_per_dataset: int | None = None,
        max_val_queries: int | None = None,
        batch_size: int = 1,
        val_batch_size: int = 16,
        num_workers: int = 0,
        padding_side: str | None = None,
        pad_to_multiple_of: int | None = 8,
        seed: int = 42,
        on_error: str = "raise",
        recipe: str = "instruction",
        cache_dir: str | None = default_cache_dir(),
        packing: bool = False,
        packed_length: int = PACKED_LENGTH,
        share_query_prefix: bool = True,
    ):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"data.recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        if packing and recipe == "matryoshka":
            raise FormatConfigError("data.packing is not supported by the Matryoshka recipe: its token compression "
                                    "and exits need one pair per row; set data.packing=false")
        self.recipe, self._recipe_module = recipe, RECIPES[recipe]
        self.tokenizer = tokenizer
        self.args = self._recipe_module.DataArguments(
            train_data=train_data,
            train_group_size=train_group_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            query_instruction_for_retrieval=query_instruction,
            passage_instruction_for_retrieval=passage_instruction,
            max_example_num_per_dataset=max_example_num_per_dataset,
            seed=seed,
            on_error=on_error,
            pad_to_multiple_of=pad_to_multiple_of,
            cache_dir=cache_dir,
            **({"prompt": prompt} if prompt else {}),
            **({"padding_side": padding_side} if padding_side else {}),
        )
        self.formatter = self.args.formatter(tokenizer)  # validates lengths and Yes/No tokens now
        collate = (tokenizer, query_max_len, passage_max_len, pad_to_multiple_of, self.args.padding_side)
        packed = ({"packing": packing, "packed_length": packed_length, "share_query_prefix": share_query_prefix}
                  if packing else {})
        self.collator = self._recipe_module.RerankCollator(*collate, **packed)  # training groups
        self.pair_collator = instruction.RerankCollator(*collate, **packed)  # validation pairs
        if val_data and val_beir:
            raise ValueError("give validation data either as val_data (candidate lists) or val_beir, not both")
        self.val_data, self.val_beir, self.max_val_queries = val_data, val_beir, max_val_queries
        self.batch_size, self.val_batch_size, self.num_workers = batch_size, val_batch_size, num_workers
        self.train_set: instruction.TrainDatasetForReranker | matryoshka.TrainDatasetForReranker | None = None
        self.val_set: CandidatePairs | None = None
        self.train_sampler: GroupSampler | None = None
        self._resume: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._recipe_module.TrainDatasetForReranker(self.args, self.tokenizer, self.formatter)
        if stage in (None, "fit", "validate") and self.val_set is None and self.has_val:
            if self.val_beir:  # {dir, run, split, top_k}: rerank a first-stage run (SPEC 8)
                beir = dict(self.val_beir)
                lists = load_beir_rerank(beir.pop("dir"), beir.pop("run"), **beir)[: self.max_val_queries]
            else:
                lists = load_candidate_lists(self.val_data, self.max_val_queries)
            self.val_set = CandidatePairs(lists, self.formatter)

    @property
    def val_judgements(self) -> dict | None:
        """The validation queries' judgements beyond the labels (`candidates.query_judgements`): with
        `val_beir`, the full qrels, so val/ metrics equal trec_eval's; None before setup."""
        return self.val_set.judgements if self.val_set is not None else None

    @property
    def has_val(self) -> bool:
        return bool(self.val_data or self.val_beir)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler = GroupSampler(len(self.train_set), seed=self.args.seed)
        self._apply_resume()
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=self.collator, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        collate = functools.partial(collate_candidates, collate_pairs=self.pair_collator)
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False,
                          collate_fn=collate, num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the epoch, and the facts that decide which batches come next."""
        trainer = self.trainer
        if trainer is None or self.train_set is None:
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return {"epoch": trainer.current_epoch, "batches": done,
                "samples": done * self.batch_size * trainer.world_size,  # records consumed over all ranks
                **self.resume_facts()}

    def resume_facts(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint to see the batches of an uninterrupted run."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {"train_data": self.train_set.tokens.fingerprint, "num_records": len(self.train_set),
                "train_group_size": self.args.train_group_size, "seed": self.args.seed,
                "batch_size": self.batch_size, "world_size": world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state else {}
        if self._resume and self.train_set is not None:
            now = self.resume_facts()
            changed = ["train_data (records or formatting) changed" if key == "train_data"
                       else f"{key} {self._resume[key]!r} -> {now[key]!r}"
                       for key in now if key in self._resume and self._resume[key] != now[key]]
            if changed:
                log.warning("resuming from a checkpoint of different training (%s): the resumed run will not see "
                            "the batches an uninterrupted run would", "; ".join(changed))
            # This datamodule resumes mid-epoch itself (_apply_resume); Lightning's generic warning does not apply.
            warnings.filterwarnings("ignore",
                                    message="You're resuming from a checkpoint that ended before the epoch ended")
        # trainer=fsdp restores after configure_optimizers has built the training loader: reach its sampler
        self._apply_resume()

    def _apply_resume(self) -> None:
        """Mid-epoch resume: skip what this rank already consumed so batches match an uninterrupted run.
        Records consumed over all ranks are split over this run's ranks (a changed world size keeps the position)."""
        sampler = self.train_sampler
        if self._resume and sampler is not None:
            samples = self._resume.get("samples", self._resume["batches"] * self.batch_size * sampler.num_replicas)
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip = min(samples // sampler.num_replicas, sampler.per_rank)
            self._resume = {}
