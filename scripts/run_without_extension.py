"""Run the trainer where the llada extension is not built (e.g. a fresh GPU
machine): ``python scripts/run_without_extension.py <llada.train options>``.

The trainer needs only pure-Python code (model, checkpoint, objectives,
tokenizer, tasks), but ``import llada`` loads the compiled ops. This
registers python/llada as the ``llada`` package without running its
``__init__``. Where the extension cannot be imported, a stand-in takes its
place: it declares the ops' schemas, read from csrc/ (llada.ops registers
their fake kernels and autograd rules on them at import), and every op runs
its pure-torch reference, as on a GPU the build has no kernels for, but
without the compiled argument checks (check_* ops) that precede it there.
"""

import importlib
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
package = types.ModuleType("llada")
package.__path__ = [str(ROOT / "python" / "llada")]
sys.modules["llada"] = package

# The ops' declarations: `m.def("name(args) -> out")`, its string literals
# possibly split over lines, in the TORCH_LIBRARY blocks of the llada namespace.
LIBRARY_BLOCK = re.compile(r"TORCH_LIBRARY(?:_FRAGMENT)?\(llada,\s*m\)\s*\{(.*?)\}\s*$", re.DOTALL | re.MULTILINE)
DEFINITION = re.compile(r'm\.def\(((?:\s*"(?:[^"\\]|\\.)*")+)\s*\)')


def op_schemas() -> list[str]:
    schemas = []
    for source in sorted((ROOT / "csrc").rglob("*.cpp")):
        for block in LIBRARY_BLOCK.findall(source.read_text(encoding="utf-8")):
            for literals in DEFINITION.findall(block):
                schemas.append("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', literals)))
    if not schemas:
        raise SystemExit(f"run_without_extension: no op declarations found under {ROOT / 'csrc'}")
    return schemas


try:
    importlib.import_module("llada._C")
except ImportError:
    import torch

    sys.modules["llada._C"] = types.ModuleType("llada._C")
    library = torch.library.Library("llada", "DEF")  # kept alive: the declarations live as long as it does
    for schema in op_schemas():
        library.define(schema)
        name = schema.split("(")[0]
        if name.startswith("check_"):  # the argument checks are compiled code: without it, none
            library.impl(name, lambda *args: None, "CompositeExplicitAutograd")
    from llada import devices

    # Nothing implements the declared ops: every wrapper of llada.ops (and the
    # model) takes its reference instead.
    devices.kernels_run_on = lambda device: False

from llada.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
