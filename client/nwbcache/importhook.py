"""Run a function on a module right after it is imported, without importing it.

Transparent mode must patch remfile and fsspec, but importing them at start-up
would cost every Python process of the environment hundreds of milliseconds
and could change import order under the user. So a finder sits first on
``sys.meta_path``: for a watched name it lets the other finders find the
module as they would, wraps the loader, and runs the hook once the module's
code has run, before the importer sees it. A module already imported is
hooked at once. Other imports cost one dictionary lookup.

This module runs at interpreter start-up (from the .pth file) when
NWBCACHE_URL is set, so it imports nothing that ``site`` has not: not even
``typing`` or ``warnings`` (mypy treats any ``TYPE_CHECKING`` name as true).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    Hook = Callable[[ModuleType], None]

__all__ = ["watch"]


def _run(name: str, hook: Hook, module: ModuleType) -> None:
    # A failed patch must never break the user's import: the library then
    # simply reads upstream as it would without nwbcache.
    try:
        hook(module)
    except Exception as exc:
        import warnings

        warnings.warn(
            f"nwbcache: could not hook {name} ({type(exc).__name__}: {exc}); "
            "it will read upstream directly",
            RuntimeWarning,
            stacklevel=2,
        )


class _HookingLoader:
    """The module's own loader, with the hook run after the module's code."""

    def __init__(self, loader: Any, name: str, hook: Hook) -> None:
        self._loader = loader
        self._name = name
        self._hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run(self._name, self._hook, module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_resource_reader, is_package, ...: the real loader's.
        return getattr(self._loader, name)


class _PostImportFinder:
    def __init__(self) -> None:
        self.hooks: dict[str, Hook] = {}
        # Names this finder is looking up elsewhere. No lock or thread-local
        # needed: the import system holds the module's lock around find_spec,
        # so only a re-entrant lookup from the same thread can meet this set.
        self._busy: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        hook = self.hooks.get(fullname)
        if hook is None or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = _find_elsewhere(fullname, path, target)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # nothing we can wrap: imported unpatched, as without us
        # Duck-typed: importlib.abc.Loader would cost an import at start-up.
        spec.loader = _HookingLoader(spec.loader, fullname, hook)  # type: ignore[assignment]
        return spec


def _find_elsewhere(
    fullname: str, path: Sequence[str] | None, target: ModuleType | None
) -> ModuleSpec | None:
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if isinstance(finder, _PostImportFinder) or find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return None


_finder: _PostImportFinder | None = None


def watch(hooks: Mapping[str, Hook]) -> None:
    """Run ``hooks[name](module)`` when module ``name`` is imported, or now if it is.

    A hook runs again if its module is reloaded, so hooks must be idempotent.
    """
    global _finder
    if _finder is None:
        _finder = _PostImportFinder()
        sys.meta_path.insert(0, _finder)
    _finder.hooks.update(hooks)
    for name, hook in hooks.items():
        module = sys.modules.get(name)
        if module is not None:
            _run(name, hook, module)
