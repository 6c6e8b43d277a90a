"""Score pairs with a real client in its own virtual environment (tests/test_interop.py runs this).

Usage: python client.py {transformers|flagembedding|sentence-transformers} EXPORT_DIR REQUEST.json
REQUEST: {"pairs": [[query, passage], ...], "input_ids": [[...], ...], "recipe": {...}}. Prints JSON.
Imports nothing from rerank_lightning: the client reads the export as it is.
"""

import json
import sys

import torch


def transformers_logits(path, request):
    """AutoTokenizer + AutoModelForCausalLM: the "Yes" logit at the last token of the project's input ids,
    one pair at a time (no padding), and what the tokenizer read from the export."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    yes = request["recipe"]["yes_token_id"]
    scores = []
    with torch.no_grad():
        for ids in request["input_ids"]:
            scores.append(lm(input_ids=torch.tensor([ids])).logits[0, -1, yes].item())
    q = request["recipe"]["query_instruction"] + request["pairs"][0][0]
    return {"scores": scores, "version": transformers.__version__, "tokenizer_class": type(tok).__name__,
            "padding_side": tok.padding_side, "pad_token": tok.pad_token, "bos_token_id": tok.bos_token_id,
            "query_ids": tok(q, add_special_tokens=False)["input_ids"],
            "rope_theta": getattr(lm.config, "rope_theta", None)}


def flagembedding_scores(path, request):
    from FlagEmbedding import FlagLLMReranker

    recipe = request["recipe"]
    reranker = FlagLLMReranker(path, use_fp16=False, devices=["cpu"], batch_size=4,
                               query_instruction_for_rerank=recipe["query_instruction"],
                               passage_instruction_for_rerank=recipe["passage_instruction"], prompt=recipe["prompt"])
    return {"scores": [float(s) for s in reranker.compute_score([list(p) for p in request["pairs"]])]}


def sentence_transformers_scores(path, request):
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(path, device="cpu")
    return {"scores": [float(s) for s in model.predict([tuple(p) for p in request["pairs"]], batch_size=4)]}


CLIENTS = {"transformers": transformers_logits, "flagembedding": flagembedding_scores,
           "sentence-transformers": sentence_transformers_scores}

if __name__ == "__main__":
    client, path, request_file = sys.argv[1:4]
    with open(request_file) as f:
        request = json.load(f)
    print(json.dumps(CLIENTS[client](path, request)))
