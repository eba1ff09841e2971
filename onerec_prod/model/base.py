"""The base model: a local Hugging Face directory, or the embedded small Qwen3.

No hub is reachable, so the embedded default is built here: a byte-level BPE tokenizer trained on
the catalog text (ChatML chat template and Qwen3's special tokens, so prompt rendering is the
same as with a real Qwen3 tokenizer) and a randomly initialised ``Qwen3ForCausalLM`` sized by
``ModelCfg``. The SID vocabulary is added with :func:`onerec_prod.model.vocab.expand_vocab` and
the result is saved as a normal HF directory (safetensors), so the rest of the pipeline cannot
tell it from a real checkpoint. The same inputs give the same files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from onerec_prod.config import Config, ModelCfg

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
THINK = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]
# <think>/</think> are added but not "special" (as in Qwen3): decoding keeps them.
PLAIN_ADDED_TOKENS = [THINK, THINK_END]

# ChatML, as Qwen3 renders it when no reasoning_content is split out of assistant turns.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def base_model_dir(cfg: Config) -> Path:
    """Directory of the base model: ``model.base_dir`` if set, else ``<paths.models>/base``."""
    if cfg.model.base_dir:
        return Path(cfg.model.base_dir)
    return Path(cfg.paths.models) / "base"


def _template_texts() -> list[str]:
    """Prompt template text (with its newlines) added to the BPE corpus: compact prompts."""
    from onerec_prod.samples.templates import TEMPLATES

    out = []
    for tpl in TEMPLATES.values():
        for part in ("system", "user", "response"):
            if tpl[part]:
                out.append(tpl[part])
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE on ``texts`` wrapped as a ``PreTrainedTokenizerFast`` with ChatML."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("train_tokenizer: no catalog texts to train the tokenizer on")
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) + _template_texts()
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 30,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def build_model(mcfg: ModelCfg, tokenizer):
    """Randomly initialised ``Qwen3ForCausalLM`` from ``mcfg`` (seeded), sized to ``tokenizer``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    n = len(tokenizer)
    qcfg = Qwen3Config(
        vocab_size=-(-n // 64) * 64,
        hidden_size=mcfg.hidden_size,
        intermediate_size=mcfg.intermediate_size,
        num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads,
        num_key_value_heads=mcfg.num_kv_heads,
        head_dim=mcfg.hidden_size // mcfg.num_heads,
        max_position_embeddings=mcfg.max_position,
        tie_word_embeddings=mcfg.tie_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(mcfg.seed)
        model = Qwen3ForCausalLM(qcfg)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def init_base_model(cfg: Config, catalog_texts: list[str], out_dir: str | Path) -> Path:
    """Create the base model directory ``out_dir`` (SID vocabulary included) and return it.

    With ``model.base_dir`` set, that directory (e.g. a real Qwen3) is loaded, expanded with
    the SID tokens if they are missing, and saved to ``out_dir``; ``catalog_texts`` is unused.
    Otherwise the embedded small Qwen3 and its catalog tokenizer are built. Deterministic.
    """
    from onerec_prod.model.io import load_model, load_tokenizer, save_model
    from onerec_prod.model.vocab import expand_vocab
    from onerec_prod.sid.tokens import level_sizes

    out_dir = Path(out_dir)
    sizes = level_sizes(cfg.sid)
    if cfg.model.base_dir:
        src = Path(cfg.model.base_dir)
        tokenizer, model = load_tokenizer(src), load_model(src)
        parent = str(src)
    else:
        tokenizer = train_tokenizer(catalog_texts, cfg.model.text_vocab_size)
        model = build_model(cfg.model, tokenizer)
        parent = None
    new_ids = expand_vocab(model, tokenizer, sizes, init=cfg.model.new_token_init)
    meta = {
        "stage": "base",
        "parent": parent,
        "dt": None,
        "sid_version": None,
        "sid_sizes": sizes,
        "data_versions": {},
        "new_token_ids": [new_ids[0], new_ids[-1]] if new_ids else None,
        "embedded": not cfg.model.base_dir,
        "n_catalog_texts": len(catalog_texts) if not cfg.model.base_dir else None,
    }
    save_model(model, tokenizer, out_dir, meta)
    log.info("base model written to %s (%d tokens, %d params)", out_dir, len(tokenizer),
             sum(p.numel() for p in model.parameters()))
    return out_dir


# --------------------------------------------------------------------------------------
# the base model dir, built on demand (``onerec-prod init-base-model``, the trainer's fallback)


def item_text(title: str | None, categories: str | None, description: str | None = None) -> str:
    """One catalog text line for the tokenizer corpus."""
    return " ".join(p for p in (title, categories, description) if p)


def catalog_texts_from_dataset(cfg: Config) -> list[str]:
    """Item texts of the replay dataset (``p5/items_p5_ids.jsonl``), in file order."""
    path = cfg.paths.dataset / "p5" / "items_p5_ids.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"dataset items not found: {path} (set paths.dataset_dir)")
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out.append(item_text(r.get("title"), r.get("categories"), r.get("description")))
    return out


def catalog_texts_from_table(cfg: Config) -> list[str] | None:
    """Item texts of the Delta ``catalog`` table ordered by item_id (None if it does not exist)."""
    from onerec_prod.lake import read_table, table_exists, table_path
    from onerec_prod.spark import get_spark

    spark = get_spark(cfg.spark)
    path = table_path(cfg, "catalog")
    if not table_exists(spark, path):
        return None
    rows = read_table(spark, path).select("item_id", "title", "categories", "description").collect()
    rows.sort(key=lambda r: r["item_id"])
    return [item_text(r["title"], r["categories"], r["description"]) for r in rows]


def ensure_base_model(cfg: Config, texts: str = "auto", out: str | Path | None = None,
                      force: bool = False) -> Path:
    """The base model dir, built first if it does not exist (or ``force``).

    With ``model.base_dir`` set and no ``out``, that dir is returned as is (the trainer expands
    its vocabulary when the SID tokens are missing); with ``out``, an expanded copy is written.
    """
    if cfg.model.base_dir and not out:
        # A real checkpoint is used in place; training adds missing SID tokens when it loads it.
        return base_model_dir(cfg)
    out_dir = Path(out) if out else base_model_dir(cfg)
    if out_dir.exists() and any(out_dir.glob("*.safetensors")) and not force:
        log.info("base model exists: %s (use --force to rebuild)", out_dir)
        return out_dir
    corpus: list[str] = []
    if not cfg.model.base_dir:
        got = catalog_texts_from_table(cfg) if texts in ("auto", "catalog") else None
        if got is None and texts == "catalog":
            raise FileNotFoundError("--texts catalog: the Delta catalog table does not exist yet")
        corpus = got if got is not None else catalog_texts_from_dataset(cfg)
        log.info("tokenizer corpus: %d item texts", len(corpus))
    return init_base_model(cfg, corpus, out_dir)
