"""Register the native format with transformers as soon as transformers is imported.

Importing transformers costs seconds, and most of upcycle (the CLI's `--version`, conversion,
training) never needs it. So `import upcycle` registers at once only when transformers is already
loaded; otherwise a one-shot import hook registers right after the first `import transformers`.
Either way, `AutoModelForCausalLM.from_pretrained(native_dir)` works after `import upcycle`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _register() -> None:
    from upcycle.checkpoint.hf_auto import register_with_transformers

    register_with_transformers()


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot: find the real spec with the other finders
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_then_register(module):
            original_exec(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
