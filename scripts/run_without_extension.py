"""Run the trainer where the llada extension is not built (e.g. a fresh GPU
machine): ``python scripts/run_without_extension.py <llada.train options>``.

The trainer needs only pure-Python modules (model, checkpoint, objectives,
tokenizer, tasks without decoding), but ``import llada`` loads the compiled
ops. This registers python/llada as the ``llada`` package without running its
``__init__``. Use ``--accuracy-examples 0`` with ``--task``: decoding needs the ops.
"""

import sys
import types
from pathlib import Path

package = types.ModuleType("llada")
package.__path__ = [str(Path(__file__).resolve().parent.parent / "python" / "llada")]
sys.modules["llada"] = package

from llada.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
