"""The files that let other clients load an export as it is (SPEC 9).

- transformers 4.x (and FlagEmbedding on it): transformers 5 writes a tokenizer class, special-token list
  and rope settings that 4.x cannot read or silently reads differently; `make_portable` rewrites them in
  the form both versions read the same way, with the padding side and pad token the model was trained with.
- sentence-transformers (>= 5.4): a `CrossEncoder` of a causal LM and a `LogitScore` module on "Yes", no
  activation, pairs laid out by the tokenizer's chat template, which becomes `score_template` (the recipe's
  layout over the "query" and "document" roles): a reranker export is not a chat model.
- vLLM's score API: the same chat template, and `hf_overrides` that turn the LM head into a one-token classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..data.formatting import PairFormatter

SCORE_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 keeps a tokenizer's chat template
VLLM_OVERRIDES_FILE = "vllm_hf_overrides.json"
# Tokenizer classes only transformers 5 has, and the 4.x class that reads the same tokenizer.json
V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# Pairs whose token ids the score template must reproduce; the boundaries between query, separator,
# passage and prompt are where a tokenizer may merge differently when it sees the whole text at once.
PROBE_PAIRS = [
    ("what is the capital of peru?", "Lima is the capital and largest city of Peru."),
    ("Who wrote Dracula", "Dracula (1897) was written by Bram Stoker"),
]


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def make_portable(out_dir: Path, padding_side: str, pad_token: str) -> None:
    """Rewrite `config.json` and `tokenizer_config.json` so that transformers 4.x and 5 read them alike."""
    if (out_dir / "config.json").is_file():  # an adapter-only export has none
        config = _read(out_dir / "config.json")
        config.update(legacy_rope_keys(config))
        if "dtype" in config:
            config.setdefault("torch_dtype", config["dtype"])  # the name before 4.56
        _write(out_dir / "config.json", config)

    tok = _read(out_dir / "tokenizer_config.json")
    tok["tokenizer_class"] = V5_ONLY_TOKENIZER_CLASSES.get(tok.get("tokenizer_class"), tok.get("tokenizer_class"))
    extra = tok.get("extra_special_tokens")
    if isinstance(extra, list):  # 4.x expects a {name: token} mapping here; a plain list is its older key
        del tok["extra_special_tokens"]
        tok["additional_special_tokens"] = list(dict.fromkeys([*tok.get("additional_special_tokens", []), *extra]))
    tok["padding_side"] = padding_side  # transformers 5 leaves it out of what it saves
    tok["pad_token"] = pad_token
    _write(out_dir / "tokenizer_config.json", tok)


def legacy_rope_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """`rope_theta` (and `rope_scaling`, `rope_local_base_freq`) from transformers 5's `rope_parameters`:
    without them 4.x silently falls back to its default theta of 1e4."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    keys: dict[str, Any] = {}
    if "rope_theta" not in rope:  # per layer type (Gemma 3 style): full attention, sliding attention
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:
            keys["rope_local_base_freq"] = local["rope_theta"]
        rope = rope.get("full_attention") or {}
    if "rope_theta" in rope:
        keys["rope_theta"] = rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        keys["rope_scaling"] = scaling
    return keys


def score_template(formatter: PairFormatter, lead: str = "", first_lead: str | None = None) -> str:
    """A chat template over the "query" and "document" roles that renders the recipe's layout
    `[BOS] query_instruction query SEP passage_instruction passage SEP prompt` (SPEC 3).

    The formatter tokenizes each part on its own; `lead` (" " for sentencepiece tokenizers that add a
    dummy prefix to every part) makes the whole text tokenize into the same pieces. `first_lead` (default:
    `lead`) goes before the first part, where a sentencepiece tokenizer already adds the dummy prefix itself."""
    tok = formatter.tokenizer
    recipe = formatter.recipe()

    def text(s: str, lead: str = lead) -> str:
        return "{{ " + json.dumps(lead + s, ensure_ascii=False) + " }}"

    def role(name: str) -> str:
        return '{{ messages | selectattr("role", "equalto", "' + name + '") | map(attribute="content") | first }}'

    bos = "{{ " + json.dumps(tok.convert_ids_to_tokens(formatter.bos_ids[0]), ensure_ascii=False) + " }}" \
        if formatter.bos_ids else ""
    sep = text(recipe["separator"])
    first = text(recipe["query_instruction"], lead if first_lead is None else first_lead)
    return (bos + first + role("query") + sep
            + text(recipe["passage_instruction"]) + role("document") + sep + text(recipe["prompt"]))


def template_ids(tokenizer: Any, template: str, query: str, passage: str) -> list[int]:
    messages = [{"role": "query", "content": query}, {"role": "document", "content": passage}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def matching_score_template(formatter: PairFormatter) -> str | None:
    """The score template whose token ids equal the formatter's on the probe pairs, else None."""
    for lead, first_lead in (("", ""), (" ", " "), (" ", "")):
        template = score_template(formatter, lead, first_lead)
        if all(template_ids(formatter.tokenizer, template, q, p) == formatter.encode_pair(q, p)
               for q, p in PROBE_PAIRS):
            return template
    return None


def write_score_template(out_dir: Path, template: str) -> None:
    """The score template as the tokenizer's chat template, which sentence-transformers and vLLM render pairs with."""
    (out_dir / SCORE_TEMPLATE_FILE).write_text(template)
    tok = _read(out_dir / "tokenizer_config.json")
    if tok.pop("chat_template", None) is not None:  # one template: the file
        _write(out_dir / "tokenizer_config.json", tok)


def write_sentence_transformers_files(out_dir: Path, yes_id: int) -> None:
    """modules.json (the causal LM, then `LogitScore` on "Yes"), the Transformer module's config (pairs go
    through the chat template), and the CrossEncoder config with no activation: the score is the raw "Yes" logit."""
    _write(out_dir / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"},
    ])
    logits = {"method": "forward", "method_output_name": "logits"}
    _write(out_dir / "sentence_bert_config.json", {
        "transformer_task": "text-generation",
        # text pairs become "query" / "document" messages, rendered by the score template
        "modality_config": {"text": logits, "message": {**logits, "format": "flat"}},
        "module_output_name": "causal_logits",
    })
    (out_dir / "1_LogitScore").mkdir(exist_ok=True)
    _write(out_dir / "1_LogitScore" / "config.json",
           {"true_token_id": yes_id, "false_token_id": None, "module_input_name": "causal_logits"})
    _write(out_dir / "config_sentence_transformers.json", {
        "model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity",
        "prompts": {}, "default_prompt_name": None,
    })


def write_vllm_files(out_dir: Path, architecture: str, yes_token: str) -> dict[str, Any]:
    """The `hf_overrides` that make vLLM score with the "Yes" logit (the pair layout is the chat template)."""
    overrides = {
        "architectures": [architecture.replace("ForCausalLM", "ForSequenceClassification")],
        "classifier_from_token": [yes_token],
        "method": "no_post_processing",
    }
    _write(out_dir / VLLM_OVERRIDES_FILE, overrides)
    return overrides
