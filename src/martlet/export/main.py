"""`martlet export` / `export_main`: read top to bottom.

parse -> validate -> source (merge a LoRA checkpoint when asked or needed) -> GGUF (+ Ollama Modelfile)
or bnb/GPTQ/AWQ -> push to a hub. Each output folder gets export_args.json, the arguments that made it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

from martlet.args.base import parse_cli, to_dict
from martlet.args.export import ExportArguments
from martlet.errors import MartletError
from martlet.export import quantize
from martlet.export.ollama import write_modelfile
from martlet.export.push import push_folder
from martlet.export.quantize import check_calibrated
from martlet.export.source import Source, quantization_of, resolve_source
from martlet.export.to_gguf import write_gguf
from martlet.infer.checkpoint import registered
from martlet.models.loader import load_tokenizer
from martlet.models.registry import get_model_info
from martlet.templates import get_template
from martlet.train.outputs import ARGS_FILE, RUN_INFO_FILE, library_versions, write_json
from martlet.utils import follow_umask, setup_logging

logger = logging.getLogger("martlet")
EXPORT_ARGS_FILE = "export_args.json"


def export_main(args: ExportArguments | Sequence[str] | None = None) -> dict[str, Any]:
    """Run the export; returns the folders and files written ({source, merged, gguf, modelfile, ...})."""
    setup_logging()
    if not isinstance(args, ExportArguments):
        args = parse_cli(ExportArguments, args)
    args.validate()
    method = args.effective_quant_method()
    if method in ("gptq", "awq"):  # fail before a long merge when this machine cannot do it
        check_calibrated(method)

    source = resolve_source(args, needs_weights=method is not None)
    quantized = quantization_of(source.path) if method else None
    if quantized:
        raise MartletError(f"this model is already {quantized}-quantized: quantizing it again loses precision.",
                           file=source.path, field="quant_method", hint="Export from the full-precision model.")
    result: dict[str, Any] = {"source": source.path}
    if source.checkpoint is not None and source.path != source.checkpoint.path:
        result["merged"] = source.path
    if method == "gguf":
        result.update(export_gguf(args, source))
    elif method is not None:
        result["quantized"] = export_quantized(method, args, source)
    if args.push_to_hub:
        folder = result.get("gguf_dir") or result.get("quantized") or source.path
        result["hub_url"] = push_folder(folder, args.hub_model_id, hub=args.effective_hub(), token=args.hub_token,
                                        private=args.hub_private_repo, commit_message=args.commit_message)
    return result


def _load_template(args: ExportArguments, source: Source):
    """The tokenizer of the source and the chat template training used (or --template_type)."""
    tokenizer = load_tokenizer(source.path, trust_remote_code=args.trust_remote_code)
    run = source.checkpoint.run if source.checkpoint is not None else {}
    name = args.template_type
    if name == "AUTO" and run.get("template_type") not in (None, "tokenizer", "AUTO"):
        name = run["template_type"]
    registered_type = registered(source.model_type)
    fallback = get_model_info(registered_type).template if registered_type else "default"
    system = args.system if args.system is not None else run.get("system")
    template = get_template(name, tokenizer, system, fallback=fallback)
    template.stop_words = list(dict.fromkeys([*template.stop_words, *run.get("stop_words", [])]))
    return tokenizer, template


def _output_dir(args: ExportArguments, source: Source, suffix: str) -> str:
    if args.output_dir:
        return os.path.abspath(os.path.expanduser(args.output_dir))
    if source.checkpoint is not None:
        return source.checkpoint.path.rstrip(os.sep) + f"-{suffix}"
    return os.path.abspath(f"{source.model_type or os.path.basename(source.path)}-{suffix}")


def export_gguf(args: ExportArguments, source: Source) -> dict[str, Any]:
    """<out>/<name>-<type>.gguf, and a Modelfile beside it with --to_ollama."""
    tokenizer, template = _load_template(args, source)
    out_dir = _output_dir(args, source, "gguf")
    os.makedirs(out_dir, exist_ok=True)
    gguf_type = args.effective_gguf_type()
    run = source.checkpoint.run if source.checkpoint is not None else {}
    name = source.model_type or run.get("model_type") or os.path.basename(source.path.rstrip(os.sep))
    path = os.path.join(out_dir, f"{name}-{gguf_type}.gguf")
    logger.info("writing %s (%s)", path, gguf_type)
    info = write_gguf(source.path, path, gguf_type, tokenizer, chat_template=template.chat_template,
                      eot_token=template.eot, name=name)
    follow_umask(path)
    logger.info("GGUF: %s (%.1f MB)", path, info["bytes"] / 1e6)
    _save_args(out_dir, args)
    result = {"gguf_dir": out_dir, "gguf": path, "gguf_bytes": info["bytes"]}
    if args.to_ollama:
        modelfile = write_modelfile(out_dir, os.path.basename(path), template, system=template.system,
                                    model_dir=source.path)
        logger.info("Ollama Modelfile: %s (ollama create NAME -f %s)", modelfile["path"], modelfile["path"])
        result["modelfile"] = modelfile["path"]
    return result


def export_quantized(method: str, args: ExportArguments, source: Source) -> str:
    """A bnb, GPTQ or AWQ model folder, <ckpt>-<method>-int<bits> by default; returns it."""
    target = _output_dir(args, source, f"{method}-int{args.quant_bits}")
    tokenizer, template = _load_template(args, source)
    samples = quantize.calibration_rows(args, source, tokenizer, template) if method != "bnb" else None
    with _atomic_dir(target) as tmp:
        if method == "bnb":
            quantize.quantize_bnb(source.path, tmp, args)
        else:
            quantize.quantize_calibrated(method, source.path, tmp, args, samples)
        tokenizer.save_pretrained(tmp)
        _copy_run_files(source, tmp)
        _save_args(tmp, args)
    logger.info("%s model: %s", method, target)
    return target


def _copy_run_files(source: Source, folder: str) -> None:
    for base in {source.path, source.checkpoint.path if source.checkpoint else source.path}:
        for name in (ARGS_FILE, RUN_INFO_FILE, "generation_config.json"):
            path = os.path.join(base, name)
            if os.path.isfile(path) and not os.path.exists(os.path.join(folder, name)):
                shutil.copy2(path, os.path.join(folder, name))


def _save_args(folder: str, args: ExportArguments) -> None:
    values = to_dict(args)
    values["hub_token"] = None if values.get("hub_token") is None else "<hidden>"
    write_json(os.path.join(folder, EXPORT_ARGS_FILE), {"arguments": values, "versions": library_versions()})


@contextlib.contextmanager
def _atomic_dir(target: str) -> Iterator[str]:
    """A temporary folder beside `target`, renamed into place (replacing an older one) only on success."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        follow_umask(tmp)  # safetensors writes its files 0600
        old = f"{tmp}-old"
        if os.path.isdir(target):
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    result = export_main(argv)
    printed = set()
    for key in ("merged", "source", "gguf", "modelfile", "quantized", "hub_url"):  # each path once
        if result.get(key) and result[key] not in printed:
            print(f"{key}: {result[key]}")
            printed.add(result[key])
    return 0
