"""The adapter layer stands alone: ``import mor_model`` loads the adapter modules only, none of the SR
application (``mor_model.sr/train/eval/cli``) and none of the heavy libraries that only the application or
a first use needs."""

from __future__ import annotations

import json
import subprocess
import sys

APPLICATION = ("mor_model.sr", "mor_model.train", "mor_model.eval", "mor_model.cli")
HEAVY = ("diffusers", "open_clip", "PIL", "transformers", "matplotlib", "accelerate", "lpips")


def _modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_import_mor_model_loads_the_adapter_layer_only():
    loaded = _modules_after("import mor_model")
    assert "mor_model.layers" in loaded and "mor_kernels" in loaded  # the check itself can see modules
    app = [m for m in loaded if m.startswith(APPLICATION)]
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not app, f"import mor_model pulled in the SR application: {app}"
    assert not heavy, f"import mor_model pulled in {sorted({m.split('.')[0] for m in heavy})}"


def test_public_api_is_the_adapter_layer():
    import mor_model

    for name in mor_model.__all__:
        obj = getattr(mor_model, name)
        module = getattr(obj, "__module__", "mor_model") or "mor_model"
        assert not module.startswith(APPLICATION), f"mor_model.{name} comes from the application ({module})"
