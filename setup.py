"""Build glue for the DDPFAULT_PLAN import hook; the project's metadata is in pyproject.toml.

``pytest-ddpfault.pth`` must land in site-packages itself (not inside the package) for the
interpreter to run it at start-up. Its one line does nothing unless ``DDPFAULT_PLAN`` is set
(see ``pytest_ddpfault/env_plan.py``). Three ways in, as pytest-cov does it:

- a wheel (``pip install .``, ``python -m build``): ``build_py`` copies it to the root of
  ``build_lib``, which is the root of the wheel, which installs into site-packages;
- an editable install (``pip install -e .``, PEP 660): ``editable_wheel`` writes it into the
  editable wheel next to setuptools' own ``__editable__`` .pth;
- legacy ``setup.py develop``: ``develop`` copies it into the install dir.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop

PTH = Path(__file__).resolve().parent / "pytest-ddpfault.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)), preserve_mode=False)


class DevelopWithPth(develop):
    def run(self) -> None:
        super().run()
        self.copy_file(str(PTH), str(Path(self.install_dir, PTH.name)), preserve_mode=False)


cmdclass = {"build_py": BuildPyWithPth, "develop": DevelopWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: pip falls back to ``setup.py develop``
    pass
else:
    class EditableWheelWithPth(editable_wheel):
        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            # Whatever is in unpacked_wheel goes into the editable wheel's root.
            files, mapping = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            self.copy_file(str(PTH), str(Path(unpacked_wheel, PTH.name)), preserve_mode=False)
            return files, mapping

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
