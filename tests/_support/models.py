"""The seeded example models (tandem.compiler.examples), under the name the tests import."""

from tandem.compiler.examples import *  # noqa: F403
from tandem.compiler.examples import __all__  # noqa: F401
