"""``from trl.core import X`` becomes ``from rlhf_cli.core import X``: legacy TRL's helpers, kept in
the TRL layer (:mod:`rlhf_cli.trl.core`) and re-exported under this public name."""

from rlhf_cli.trl.core import *  # noqa: F401,F403  (the public names are rlhf_cli.trl.core.__all__)
from rlhf_cli.trl.core import __all__  # noqa: F401
