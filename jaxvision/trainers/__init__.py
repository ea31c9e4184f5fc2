"""The trainers, one package each, over the training core (`jaxvision.train`), which never
imports them.

`TRAINERS` is the one table the command line (`jaxvision <trainer>`, `jaxvision plan`) reads: a
trainer's name → its config schema and its `run` / `plan` functions. To add a trainer, write a
package with `config.py` (the schema and `load`), its data and loss, and `train.py` (`run`,
`plan`), then add one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A registered trainer.

    Attributes:
      package: the trainer's package; it exports `load(path, overrides)` (its config schema,
        filled from a YAML file and dotted overrides), `run(config)` and
        `plan(config, platform=None)`.
    """

    package: str

    def module(self) -> Any:
        # Imported on use: `jaxvision --help` stays fast and a trainer's dependencies load only for it.
        return importlib.import_module(self.package)

    def load(self, path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
        return self.module().load(path, overrides)

    @property
    def run(self) -> Callable[..., Any]:
        return self.module().run

    @property
    def plan(self) -> Callable[..., dict[str, Any]]:
        return self.module().plan


TRAINERS: dict[str, Trainer] = {
    "dreambooth": Trainer("jaxvision.trainers.dreambooth"),
    "finetune": Trainer("jaxvision.trainers.vit_finetune"),
}
