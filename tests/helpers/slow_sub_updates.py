"""`phased-dmd` with one slow iteration, for the preemption tests (a test hook, run by torchrun
as a script: ``torchrun ... tests/helpers/slow_sub_updates.py train --config ...``).

Each sub-update (every fake update and the generator update) of iteration
``PHASED_DMD_TEST_SLOW_ITERATION`` first sleeps ``PHASED_DMD_TEST_SUB_UPDATE_SECONDS``, standing
in for the seconds a sub-update takes at 720p; the sleep goes on through SIGTERM, as a DiT's
compute does. Before it sleeps, rank 0 creates ``started_<iteration>_<sub-update>`` (0, 1, ...
for the fake updates, ``generator`` for the generator update) in ``PHASED_DMD_TEST_MARKERS``,
so that a test knows where the run is. The numbers are the plain run's: the sleeps change no
random draw.
"""

import os
import sys
import time
from pathlib import Path

from phased_dmd_mega import cli
from phased_dmd_mega.distill.phased import PhasedDMD

_plain_fake_update, _plain_generator_update = PhasedDMD.fake_update, PhasedDMD.generator_update


def _slow(iteration: int, name: str) -> None:
    if iteration != int(os.environ["PHASED_DMD_TEST_SLOW_ITERATION"]):
        return
    if os.environ.get("RANK", "0") == "0":
        markers = Path(os.environ["PHASED_DMD_TEST_MARKERS"])
        markers.mkdir(parents=True, exist_ok=True)
        (markers / f"started_{iteration}_{name}").touch()
    time.sleep(float(os.environ["PHASED_DMD_TEST_SUB_UPDATE_SECONDS"]))


def _fake_update(self, phase, batch, iteration, index, anchor):
    _slow(iteration, str(index))
    return _plain_fake_update(self, phase, batch, iteration, index, anchor)


def _generator_update(self, phase, batch, iteration):
    _slow(iteration, "generator")
    return _plain_generator_update(self, phase, batch, iteration)


if __name__ == "__main__":
    PhasedDMD.fake_update, PhasedDMD.generator_update = _fake_update, _generator_update
    sys.exit(cli.main(sys.argv[1:]))
