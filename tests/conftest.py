"""Session set-up shared by every test module.

torchvision's PyPI wheels are CUDA builds; next to the CPU torch of this project's machines its
compiled ops do not load and ``import torchvision`` fails, and so does every import of transformers
(which imports torchvision whenever it is installed). ``import_torchvision`` defines the missing
operator schemas first (a no-op where torchvision loads by itself); when torchvision is not
installed nothing happens.
"""

from __future__ import annotations

from fixtures.torchvision_compat import import_torchvision

try:
    import_torchvision()
except ImportError:
    pass
