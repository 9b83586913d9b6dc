"""The one fact the recording stack and replay share about a process: whether replay started it.

``flordb-build replay`` sets :data:`REPLAY_ENV` (the replay spec as JSON, hindsight/_model.py) in the
processes it starts. A leaf module, so that the runtime, ``asof`` and the replay model read the
name without importing each other.
"""

REPLAY_ENV = "FLOR_REPLAY"
