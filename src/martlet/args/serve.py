"""The arguments of `martlet deploy` (an OpenAI-compatible server) and `martlet app-ui` (a chat page): the
inference arguments (model, checkpoint, template, generation defaults) plus where to listen; and those of
`martlet web-ui` (the training page): where runs go and where to listen."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, ClassVar, List, Optional

from martlet.args.base import Route, arg, check_ranges
from martlet.args.infer import InferArguments
from martlet.errors import MartletError


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def deploy_adapters(raw: Any) -> dict[str, Any]:
    """ms-swift 3's `martlet deploy --adapters`: name=path entries are --lora_modules; one folder without a name
    is --ckpt_dir (served as the model)."""
    items = [str(item) for item in (raw if isinstance(raw, list) else [raw])]
    folders = [item for item in items if "=" not in item]
    if len(folders) > 1:
        raise MartletError(f"--adapters takes at most one folder without a name (it is --ckpt_dir), got "
                           f"{len(folders)}: {' '.join(folders)}.", field="ckpt_dir",
                           hint="Name the others, each as name=path: --adapters a=DIR1 b=DIR2.")
    pairs = [item for item in items if "=" in item]
    return {**({"ckpt_dir": folders} if folders else {}), **({"lora_modules": pairs} if pairs else {})}


@dataclass
class ServerArguments:
    host: str = arg("127.0.0.1", "Address to listen on. 0.0.0.0 opens the server to other machines (set --api_key "
                                 "then).")
    port: int = arg(8000, "Port to listen on; 0 picks a free one (the address is printed at start).",
                    bounds="[0, 65535]")
    api_key: Optional[str] = arg(None, "A key every /v1 request must send as 'Authorization: Bearer KEY'. Default: "
                                       "no key needed.")
    served_model_name: Optional[str] = arg(None, "The name clients ask for (the request's `model`). Default: the "
                                                 "model type, else the model or checkpoint folder's name.")
    lora_modules: List[str] = arg([], "More LoRA adapters of the same base model, each as name=path; a request "
                                      "picks one by its `model`. The model of --ckpt_dir / --model_id_or_path "
                                      "stays served under its own name. ms-swift 3's --adapters name=path ... "
                                      "lands here (and a folder given there without a name in --ckpt_dir).")
    max_body_bytes: int = arg(2 * 1024 * 1024, "Largest request body in bytes; a larger one is refused (413).",
                              bounds="[1024, inf)")
    shutdown_timeout: int = arg(30, "On SIGTERM, seconds to let requests in flight finish before closing.",
                                bounds="[0, inf)")
    access_log: bool = arg(False, "Log every HTTP request.")


@dataclass
class DeployArguments(ServerArguments, InferArguments):
    """Serve a model or checkpoint over an OpenAI-compatible HTTP API (`/v1/chat/completions`, ...)."""

    ROUTES: ClassVar[dict[str, Route]] = {"adapters": deploy_adapters}

    def validate(self) -> "DeployArguments":
        super().validate()
        if self.api_key is not None and not self.api_key.strip():
            raise MartletError("must not be empty.", field="api_key")
        names = [name for name, _ in self.lora_pairs()]
        if len(set(names)) != len(names) or (self.served_model_name and self.served_model_name in names):
            raise MartletError("each served model needs its own name.", field="lora_modules")
        if self.lora_modules and self.infer_backend == "vllm":
            raise MartletError("--lora_modules is not supported with --infer_backend vllm yet.", field="lora_modules",
                               hint="Serve one adapter per server with --ckpt_dir, or use --infer_backend pt.")
        return self

    def lora_pairs(self) -> list[tuple[str, str]]:
        """(name, folder) of each --lora_modules entry; MartletError on a malformed one."""
        pairs = []
        for entry in self.lora_modules:
            name, eq, path = entry.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise MartletError(f"expected name=path, got {entry!r}.", field="lora_modules")
            path = os.path.expanduser(path.strip())
            if not os.path.isdir(path):
                raise MartletError("adapter folder not found.", file=path, field="lora_modules")
            pairs.append((name.strip(), path))
        return pairs


@dataclass
class AppUIArguments(InferArguments):
    """Chat with a model or checkpoint in the browser (a gradio page)."""

    server_name: str = arg("127.0.0.1", "Address the page listens on. 0.0.0.0 opens it to other machines.",
                           aliases=("host",))
    server_port: Optional[int] = arg(None, "Port of the page. Default: 7860, or the next free one.",
                                     aliases=("port",), bounds="[0, 65535]")
    share: bool = arg(False, "Also publish a temporary public gradio.live link (needs internet).")
    title: Optional[str] = arg(None, "Heading of the page. Default: the model's name.")


@dataclass
class WebUIArguments:
    """Train, watch, chat and export in the browser (a gradio page that starts the CLI)."""

    output_dir: str = arg("output", "Where runs go (<output_dir>/<model_type>/v<N>-<time>/, as for `martlet sft`) "
                                    "and where past runs are found. The page keeps its job logs and uploaded "
                                    "files in <output_dir>/web-ui/.")
    server_name: str = arg("127.0.0.1", "Address the page listens on. 0.0.0.0 opens it to other machines (anyone "
                                        "who reaches it can start runs).", aliases=("host",))
    server_port: Optional[int] = arg(None, "Port of the page. Default: 7860, or the next free one.",
                                     aliases=("port",), bounds="[0, 65535]")

    def validate(self) -> "WebUIArguments":
        check_ranges(self)
        if os.path.isfile(self.output_dir):
            raise MartletError("is a file; it must be a folder.", file=self.output_dir, field="output_dir")
        return self
