"""One benchmark process: `python -m benchmarks.worker MODULE:FUNCTION SETTINGS_JSON [OUT_JSON]`.

The orchestrator (`benchmarks.run`) starts one fresh process per measurement, so no two
libraries share threads, allocators or XLA caches, and a crash or an out-of-memory kill costs
one row, not the run. FUNCTION takes the settings dict and returns result rows; they are written
to OUT_JSON (or printed). The Flax peers' virtual environment runs this file too: it imports only
the standard library and the named module.
"""

from __future__ import annotations

import importlib
import json
import sys

from benchmarks.timing import write_rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or ":" not in argv[0]:
        sys.exit("usage: python -m benchmarks.worker MODULE:FUNCTION SETTINGS_JSON [OUT_JSON]")
    module_name, function_name = argv[0].split(":", 1)
    function = getattr(importlib.import_module(module_name), function_name)
    settings = {"warmup": 1, "iters": 3, "gpu": False, **json.loads(argv[1])}
    write_rows(function(settings), argv[2] if len(argv) == 3 else None)


if __name__ == "__main__":
    main()
