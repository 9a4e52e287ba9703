"""Triton kernels for the projected and quantized optimizer updates and for fake quantization, a C++ kernel for
quantized Adam on CPU (`lowmem.kernels.cpu_adam`), and a dispatcher (`lowmem.kernels.dispatch`: Triton on CUDA,
the pure-torch path elsewhere). A kernel takes tensors and numbers only; the optimizer part or layer that calls
it keeps the torch path of the same math and turns its own state into the kernel's arguments.

The import name is `lowmem.kernels` (pyproject maps this folder there). `kernels` is the Hugging Face kernel
hub's name, which bitsandbytes and transformers import: a script run from a checkout's root has this folder
first on its path under that name, so it hands the name over to the hub package when one is installed.
"""


def _hand_over_to_hub() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", rest)
    if spec is None:
        return  # no hub package: stay an empty module, which transformers' version check reports as unusable
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this runs
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_to_hub()
