"""The ML interatomic potentials, loaded as models or ASE calculators, and the energy scale each predicts.

- ``load_chgnet`` / ``chgnet_calculator``: CHGNet 0.3.0 (weights ship with the chgnet package), the model
  loaded once per (model, device) per process.
- ``sevenn_calculator(model="7net-0")``: SevenNet (``pip install 'crystal-grpo[sevenn]'``). 7net-0 is
  trained on MPtrj like CHGNet, but on its raw GGA/GGA+U energies: MP2020 corrections must be added
  before E_hull (``energy_scale="mp_uncorrected"``; measured, see tests/test_evaluation.py).
- ``uma_calculator(checkpoint, task_name="omat")``: UMA from a local checkpoint file via fairchem
  (``pip install 'crystal-grpo[uma]'``). OMat24/UMA energies are on their own DFT scale (other
  pseudopotentials, no MP corrections): fairchem warns against MP2020 corrections and MP references with
  them, so they are tagged ``energy_scale="other"`` and the MP-20 hull refuses them.

The optional packages are imported lazily; a clear ImportError names the extra to install. The energy scale
matters only for E_hull; for -E_tot any calculator works.
"""

from __future__ import annotations

import contextlib
import io
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

# Which energy scale a potential predicts, needed to put its energies on the MP-20 hull:
# "mp2020_corrected": MP GGA/GGA+U energies with MP2020 corrections included (CHGNet 0.3.0, measured: see
#   tests/test_hull.py); "mp_uncorrected": raw MP GGA/GGA+U energies, the correction must be added
#   (SevenNet-0, measured: it sits ~0.2 eV/atom above CHGNet on sulfides and selenides, by exactly the
#   MP2020 anion corrections, see tests/test_evaluation.py);
# "other": any other DFT setup (UMA/OMat24), not comparable with MP formation energies.
EnergyScale = Literal["mp2020_corrected", "mp_uncorrected", "other"]


def load_chgnet(model_name: str = "0.3.0", device: str | None = None):
    """The pretrained CHGNet, loaded once per (model, device) per process (loading takes ~1 s)."""
    return _load_chgnet(model_name, device)  # positional: lru_cache keys differ for f() and f("0.3.0")


@lru_cache(maxsize=4)
def _load_chgnet(model_name: str, device: str | None):
    from chgnet.model import CHGNet

    with _unprinted():  # CHGNet's constructor prints its size whatever `verbose` says
        return CHGNet.load(model_name=model_name, use_device=device, verbose=False)


def chgnet_calculator(model_name: str = "0.3.0", device: str | None = None) -> Any:
    """CHGNet's ASE calculator (weights ship with the chgnet package); device None picks CUDA if present."""
    from chgnet.model.dynamics import CHGNetCalculator

    model = load_chgnet(model_name, device)
    with _unprinted():  # it prints the device it runs on
        return CHGNetCalculator(model=model, use_device=device)


def _unprinted():
    """Swallow what a library prints to stdout, which is a command's own output."""
    return contextlib.redirect_stdout(io.StringIO())


def _missing(package: str, extra: str, exc: ImportError) -> ImportError:
    return ImportError(
        f"{package} is not installed; install it with: pip install 'crystal-grpo[{extra}]' ({exc})"
    )


def sevenn_calculator(model: str = "7net-0", device: str = "cpu") -> Any:
    """SevenNet's ASE calculator for a pretrained model name or a checkpoint path."""
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError as exc:
        raise _missing("SevenNet (sevenn)", "sevenn", exc) from exc
    return SevenNetCalculator(model=model, device=device)


def uma_calculator(checkpoint: str | Path, task_name: str = "omat", device: str = "cpu") -> Any:
    """fairchem's ASE calculator for a local UMA checkpoint (no download)."""
    try:
        from fairchem.core import FAIRChemCalculator, pretrained_mlip
    except ImportError as exc:
        raise _missing("fairchem-core", "uma", exc) from exc
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"UMA checkpoint not found: {checkpoint}")
    predictor = pretrained_mlip.load_predict_unit(str(checkpoint), device=device)
    return FAIRChemCalculator(predictor, task_name=task_name)
