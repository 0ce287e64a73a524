"""Shim so that `pip install -e .` works with older tooling; metadata lives in setup.cfg."""

from setuptools import setup

setup()
