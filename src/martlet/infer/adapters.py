"""Several LoRA adapters on one base model, and which of them a generation runs with.

`attach_adapters` loads each `--lora_modules name=path` into the (peft) model under its name.
`AdapterGate.use(name)` switches the model to that adapter (None: the base model, adapters off;
AS_LOADED: the adapter that was active when the gate was made, if any) and
holds it there while generating. Requests for the adapter that is active run side by side; a request
for another adapter waits until they are done, and newcomers queue behind it (first come, first served),
so no adapter starves.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from typing import Any, Iterator, Optional, Sequence

from martlet.errors import MartletError
from martlet.utils import libraries_quietly

AS_LOADED = "<as loaded>"  # not an adapter name: the model as it was loaded (its active adapter, if any)


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "set_adapter")


def attach_adapters(model: Any, modules: Sequence[tuple[str, str]]) -> Any:
    """`model` with each (name, folder) LoRA adapter loaded, frozen; a plain model is wrapped by peft."""
    from peft import PeftModel

    for name, folder in modules:
        if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
            raise MartletError("this folder holds no LoRA adapter (adapter_config.json).", file=folder,
                               field="lora_modules")
        try:
            with libraries_quietly():
                if is_peft(model):
                    model.load_adapter(folder, adapter_name=name, is_trainable=False)
                else:
                    model = PeftModel.from_pretrained(model, folder, adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes of another base model, a broken file
            raise MartletError(f"cannot load adapter '{name}' on this base model: {exc}", file=folder,
                               field="lora_modules", hint="Every --lora_modules adapter must be trained on the "
                                                          "model being served.") from None
    model.eval()
    return model


class AdapterGate:
    """Runs generations with the adapter each asks for; only generations with the same one overlap."""

    def __init__(self, model: Any):
        self.model = model
        self.peft = is_peft(model)
        self.active: Optional[str] = model.active_adapter if self.peft else None
        self.loaded = self.active
        self.holders = 0
        self.cond = threading.Condition()
        self.waiting: list[tuple[int, Optional[str]]] = []
        self.tickets = itertools.count()

    def _may_enter(self, ticket: int, name: Optional[str]) -> bool:
        ahead = list(itertools.takewhile(lambda w: w[0] != ticket, self.waiting))
        if any(other != name for _, other in ahead):
            return False  # someone who came first wants another adapter
        return self.holders == 0 or self.active == name

    def _switch(self, name: Optional[str]) -> None:
        if name is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(name)
        self.active = name

    @contextlib.contextmanager
    def use(self, name: Optional[str]) -> Iterator[None]:
        name = self.loaded if name == AS_LOADED else name
        if not self.peft:
            if name is not None:
                raise ValueError(f"adapter {name!r} asked of a model without adapters")
            yield
            return
        with self.cond:
            ticket = next(self.tickets)
            self.waiting.append((ticket, name))
            try:
                self.cond.wait_for(lambda: self._may_enter(ticket, name))
            finally:
                self.waiting.remove((ticket, name))
            if self.active != name:
                self._switch(name)
            self.holders += 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.holders -= 1
                self.cond.notify_all()
