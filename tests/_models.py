"""The seeded example models (compiler/_examples.py), under the name the tests import."""

from compiler._examples import *  # noqa: F403
from compiler._examples import __all__  # noqa: F401
