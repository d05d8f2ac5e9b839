"""Package exports loaded on first use (PEP 562), for `model` and `stages.training`: importing the package, or a
torch-free module inside it (model.config; stages.training.launch), does not import torch. The Snakefile reads such
modules (a checkpoint's eval inputs, a rule's launch line) on every `snakemake` call, where torch cost ~3 s of DAG
parsing each time.

Two rules for a package using this: no export shares its submodule's name (importing a submodule binds that name on
the package, which would then shadow the export), and the package states its submodule imports statically, in a
function never called, so stages.common.repo_imports (an AST scan) still counts those files as rule inputs."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, list[str]],
                 namespace: dict) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: exports maps a submodule to the names it provides; a name read once is
    cached in the package's namespace (its globals())."""
    home = {name: module for module, names in exports.items() for name in names}
    clash = sorted(set(home) & set(exports))
    if clash:
        raise ImportError(f"{package}: exports {clash} share a submodule's name")

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home})

    return __getattr__, __dir__
