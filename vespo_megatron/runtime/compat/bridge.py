"""Megatron-Bridge on a machine without Transformer Engine: an import hook for its one TE-importing module."""

from __future__ import annotations


def allow_bridge_without_transformer_engine() -> bool:
    """Let ``megatron.bridge`` import on a machine without Transformer Engine; True when it did anything.

    Upstream module: ``megatron.bridge.peft.lora_layers`` (Megatron-Bridge 0.6.2) runs
    ``import transformer_engine.pytorch as te`` at import time, and the bridge's conversion package
    imports it unconditionally (``conversion/peft_bridge.py`` -> ``peft/canonical_lora.py``), so
    ``from megatron.bridge import AutoBridge`` fails without TE although HF <-> Megatron weight
    conversion never touches TE. We load that one module from its own source with a private
    ``__import__`` that answers the ``transformer_engine`` import with a stand-in whose classes
    match nothing (``isinstance`` is False) and raise if instantiated. ``sys.modules`` never gets a
    ``transformer_engine`` entry, so every other ``try: import transformer_engine`` still sees TE as
    absent. Never active when real TE is importable. patches/bridge-without-te.md explains more.
    """
    import builtins
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    import types

    target = "megatron.bridge.peft.lora_layers"
    if importlib.util.find_spec("transformer_engine") is not None:
        return False
    if target in sys.modules or any(getattr(f, "vespo_bridge_without_te", False) for f in sys.meta_path):
        return True

    class _Absent(types.ModuleType):
        """``transformer_engine`` / ``.pytorch`` / ``.pytorch.ops`` stand-in: every attribute is a class
        that no object is an instance of, and that refuses to be built."""

        def __getattr__(self, name: str):
            if name.startswith("__"):
                raise AttributeError(name)
            if name in ("pytorch", "ops"):
                value = _Absent(f"{self.__name__}.{name}")
            else:
                def refuse(*_args, _name=f"{self.__name__}.{name}", **_kwargs):
                    raise RuntimeError(f"{_name} needs Transformer Engine, which is not installed "
                                       "(Megatron-Bridge LoRA fused paths); install transformer-engine")

                value = type(name, (), {"__new__": staticmethod(refuse)})
            setattr(self, name, value)
            return value

    stand_in = _Absent("transformer_engine")
    real_import = builtins.__import__

    def private_import(name, globals_=None, locals_=None, fromlist=(), level=0):
        if level == 0 and (name == "transformer_engine" or name.startswith("transformer_engine.")):
            return stand_in
        return real_import(name, globals_, locals_, fromlist, level)

    class _Loader(importlib.machinery.SourceFileLoader):
        def exec_module(self, module):
            namespace = dict(vars(builtins))
            namespace["__import__"] = private_import
            module.__builtins__ = namespace
            code = self.get_code(module.__name__)
            exec(code, module.__dict__)  # noqa: S102 - the upstream module's own source

    class _Finder(importlib.abc.MetaPathFinder):
        vespo_bridge_without_te = True

        def find_spec(self, fullname, path=None, target_module=None):
            if fullname != target:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target_module)
                if spec is not None and spec.origin:
                    return importlib.util.spec_from_file_location(
                        fullname, spec.origin, loader=_Loader(fullname, spec.origin))
            return None

    sys.meta_path.insert(0, _Finder())
    return True
