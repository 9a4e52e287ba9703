"""lowmem: memory-efficient LLM pretraining."""
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _bind_checkout_kernels() -> None:
    """Make `lowmem.kernels` the `kernels/` folder beside this package when running from a checkout.

    An install puts that folder at lowmem/kernels (pyproject's package-dir mapping). A checkout has it one
    level up, and the editable finder of whichever checkout was installed resolves the name only after path
    lookups fail, so another worktree's kernels would load silently: bind this checkout's folder first."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if _os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init):
        return  # installed as a wheel (or a layout without the folder): the import system finds it
    spec = _importlib_util.spec_from_file_location(f"{__name__}.kernels", init, submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_bind_checkout_kernels()
