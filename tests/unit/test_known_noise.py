"""The dependency noise filtered by name (phased_dmd_mega/known_noise.py): each named warning and
log record is hidden, anything else, even of the same category or from the same logger, shows."""

import logging
import subprocess
import sys
import warnings

import pytest

from phased_dmd_mega import known_noise
from phased_dmd_mega.known_noise import KNOWN_LOG_RECORDS, KNOWN_WARNINGS


def shown_after_install(message: str, category) -> bool:
    """Whether ``warnings.warn(message, category)`` prints once every filter is installed, from a
    clean slate (no filters of Python's, pytest's or an earlier import)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        known_noise.install()
        known_noise.install_without_cuda()
        warnings.warn(message, category, stacklevel=1)
    return bool(caught)


def test_there_is_something_to_filter():
    names = {known.name for known in KNOWN_WARNINGS}
    assert len(names) == len(KNOWN_WARNINGS) >= 3  # each filter has its own name
    assert any("Transformer Engine" in known.example for known in KNOWN_WARNINGS)


@pytest.mark.parametrize("known", KNOWN_WARNINGS, ids=lambda known: known.name)
def test_each_named_warning_is_hidden(known):
    assert not shown_after_install(known.example, known.category)


@pytest.mark.parametrize("known", KNOWN_WARNINGS, ids=lambda known: known.name)
def test_the_same_text_in_another_category_still_shows(known):
    other = DeprecationWarning if not issubclass(known.category, DeprecationWarning) else RuntimeWarning
    assert not issubclass(other, known.category)
    assert shown_after_install(known.example, other)


@pytest.mark.parametrize(
    "message, category",
    [
        ("an unrelated warning a user should see", UserWarning),
        ("Transformer Engine is installed but too old", UserWarning),  # same library, another message
        ("`torch.distributed.all_reduce_coalesced` is deprecated", FutureWarning),  # another collective
        ("CUDA_DEVICE_MAX_CONNECTIONS is ignored", UserWarning),  # names the variable, not the advice
    ],
)
def test_other_warnings_still_show(message, category):
    assert shown_after_install(message, category)


def test_without_cuda_filters_only_come_with_install_without_cuda():
    cpu_only = [known for known in KNOWN_WARNINGS if known.without_cuda_only]
    assert cpu_only, "the CUDA_DEVICE_MAX_CONNECTIONS advice is noise on CPU machines only"
    for known in cpu_only:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            known_noise.install()
            warnings.warn(known.example, known.category, stacklevel=1)
        assert caught, f"{known.name} is hidden on machines with CUDA too"


@pytest.mark.parametrize("known", KNOWN_LOG_RECORDS, ids=lambda known: known.name)
def test_named_log_records_are_dropped_and_others_kept(known, caplog):
    known_noise.install_without_cuda()
    known_noise.install_without_cuda()  # twice: one filter, not two
    logger = logging.getLogger(known.logger)
    assert sum(isinstance(f, known_noise._KnownRecordFilter) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=known.logger):
        logger.warning(known.example)
        logger.warning("a different warning from the same logger")
    assert [record.getMessage() for record in caplog.records] == ["a different warning from the same logger"]


@pytest.mark.slow  # a fresh interpreter importing megatron-core: about 10 s on 2 busy cores
def test_importing_megatron_through_the_package_prints_no_known_warning():
    """As torchrun's workers start: the package first, then megatron-core's modules (their
    notices come at import time); an unrelated warning after them still prints."""
    code = (
        "import phased_dmd_mega, warnings\n"
        "import megatron.core.optimizer, megatron.core.tensor_parallel\n"
        "warnings.warn('an unrelated warning')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "an unrelated warning" in result.stderr
    assert "Transformer Engine and Apex are not installed" not in result.stderr
