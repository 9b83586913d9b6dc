"""Does the replay still draw the random numbers the record drew? (issue 12.9)

A hindsight statement that draws from a global generator (``torch.randn``, dropout, iterating a
``DataLoader``, which draws its base seed) changes every later draw of a fresh run of the old
version: the next epoch shuffles differently, trains another model, logs other values. A replay
that then restores a checkpoint of the record goes back to the record's trajectory, so every
value it logs from there on is the record's world, not the fresh run's: wrong, and silently so.

The record keeps the generators' states at iteration ends (``flor.rng`` of an end checkpoint,
``flor.rng_before`` of the next iteration's nested point, checkpoints.RecordedGenerators). After a
replay process has run an iteration (or the code before the main loop) it compares its own with
them. A difference alone harms nothing while the process goes on from its own state; it harms
once a record's checkpoint is restored after it (a validated iteration), or when another process
goes on from one (this process stops after its segment). Then the run is reported divergent and
its values are withheld (``_backfill.decide``). Where no record of the states exists, the replay
cannot check, so a validated iteration that would restore there runs in full instead.
"""

from __future__ import annotations

from ..checkpoints import RecordedGenerators
from ..training_state import GENERATOR_NAMES, differing_generators, rng_state


class GeneratorCheck:
    """One replay process's comparison of its generators with the record's, along the main loop.

    Only a generator known to have been where the record had it (restored from a checkpoint, found
    equal at an earlier comparison, or torch's, which start from a fixed seed) is evidence when it
    differs: one the script never seeded (Python's ``random`` in most torch scripts) differs between
    any two processes from their start, and a fresh run would draw other numbers from it too.
    """

    def __init__(self, recorded: RecordedGenerators, loop_name: str) -> None:
        self._recorded = recorded
        self._loop_name = loop_name
        # Generators known to be where the record had them. torch seeds its generators with a fixed
        # seed at start (numpy's and Python's come from the OS), so they are, until something draws.
        self._synced: set[str] = {"torch", "cuda"}
        self._restored = False  # a checkpoint set every generator it holds
        #: The first difference found (None: none so far), as a user reads it.
        self.drift: str | None = None
        #: Why the run's replayed values cannot be a fresh run's (None: they can, as far as this shows).
        self.divergence: str | None = None

    def verify(self, iteration: int) -> bool:
        """After this process ran ``iteration`` (-1: the code before the main loop): True when every
        generator that can tell is as the record had it there; False when one differs, or when
        nothing recorded them there (then nothing can be told)."""
        recorded = self._recorded.at_end_of(iteration)
        if recorded is None:
            return False
        live = rng_state()
        differing = set(differing_generators(recorded, live))
        known = {k for k in recorded if k in live}
        drawn = sorted(k for k in differing if self._restored or k in self._synced)
        self._synced = (self._synced | known) - differing
        self._restored = False
        if drawn and self.drift is None:
            names = [GENERATOR_NAMES.get(k, k) for k in drawn]
            where = "before the main loop" if iteration < 0 else f"at the end of {self._loop_name} {iteration}"
            self.drift = (
                f"the replayed statements draw random numbers: {', '.join(names)} "
                f"{'differ' if len(names) > 1 else 'differs'} from the record's {where}, so a fresh run of "
                "this version with them would draw other numbers from there on"
            )
        return not drawn

    def restoring(self, iteration: int) -> None:
        """A checkpoint of the record is about to be restored at ``iteration`` (its generators with it)."""
        if self.drift is not None and self.divergence is None:
            self.divergence = f"{self.drift}, while the replay goes on from the record's checkpoint at " \
                              f"{self._loop_name} {iteration}"
        self._restored = True

    def handing_over(self) -> None:
        """This process stops after its segment: another goes on from a checkpoint of the record."""
        if self.drift is not None and self.divergence is None:
            self.divergence = f"{self.drift}, while the next segment goes on from the record's checkpoint"
