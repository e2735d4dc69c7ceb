"""Weight files: reading them with a clear error."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from mtssl.config.errors import ConfigError


def load_torch_file(path: str | Path, fix: str) -> object:
    """``torch.load`` of a weights file (CPU, tensors only); ConfigError naming the file and ``fix`` when it is
    missing, truncated or not a torch file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise ConfigError(f"{path} ({path.stat().st_size} bytes) cannot be read as a torch file: it is truncated "
                              f"or not a checkpoint ({error}); {fix}") from error
        # Python objects besides tensors (an argparse Namespace, an optimiser's class): never unpickled here.
        raise ConfigError(f"{path} holds Python objects besides tensors, which are not unpickled (that could run "
                          f"code from the file); if you trust it, save the network's tensors once: "
                          f"torch.save(torch.load(FILE, weights_only=False)['<entry>'], 'backbone.pth'), then "
                          f"evaluate that file ({str(error).splitlines()[0][:200]})") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        size = path.stat().st_size
        raise ConfigError(f"{path} ({size} bytes) cannot be read as a torch file: it is truncated (an interrupted "
                          f"copy or write?) or not a checkpoint ({type(error).__name__}: {str(error)[:200]}); "
                          f"{fix}") from error
