"""pyproject.toml's promises: the console scripts, the oldest Python it admits, and the wheel's
pin of the torch it is built against."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SOURCE_DIRS = ("qlora_ext", "bench", "python_tests", "scripts", "build_support")  # and .ci/*.py: .ci/ also holds CI's virtual environments


def _pyproject() -> dict:
    try:
        import tomllib  # novermin (Python 3.11+)
    except ModuleNotFoundError:  # Python 3.10: its predecessor, a test dependency there
        import tomli as tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_console_scripts_point_at_the_module_clis(capsys):
    """[project.scripts]: one per CLI module (python -m qlora_ext.X), each a main that answers --help."""
    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {f"qlora-{name}": f"qlora_ext.{name}:main" for name in ("finetune", "generate", "plot")}
    for target in scripts.values():
        module, function = target.split(":")
        with pytest.raises(SystemExit) as done:
            getattr(importlib.import_module(module), function)(["--help"])
        assert done.value.code == 0 and "usage: python -m " + module in capsys.readouterr().out


def test_the_clis_answer_help_without_docstrings(capsys, monkeypatch):
    """python -OO strips the module docstrings their help is made of: --help raised AttributeError."""
    for name in ("finetune", "generate", "plot"):
        module = importlib.import_module(f"qlora_ext.{name}")
        monkeypatch.setattr(module, "__doc__", None)
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        assert done.value.code == 0 and f"usage: python -m qlora_ext.{name}" in capsys.readouterr().out


def _vermin(paths: list[str], oldest: str) -> subprocess.CompletedProcess:
    """vermin (a test dependency) reports each file that needs a Python newer than ``oldest``."""
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install vermin)")
    command = [vermin, "--quiet", "--no-tips", "--violations", "--eval-annotations", f"--target={oldest}-", *paths]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO)


def test_python_code_needs_no_newer_python_than_requires_python(tmp_path):
    """Every Python file runs on the oldest Python that requires-python admits (3.10): no module,
    function or syntax of a later one (a line may opt out with a ``# novermin`` comment, as an
    import guarded by a fallback does)."""
    requires = _pyproject()["project"]["requires-python"]
    assert requires.startswith(">="), requires
    oldest = requires[2:]
    # the check is alive: a file that needs 3.11 fails it
    newer = tmp_path / "needs_311.py"
    newer.write_text("import tomllib\n")
    caught = _vermin([str(newer)], oldest)
    assert caught.returncode != 0 and "tomllib" in caught.stdout, caught.stdout + caught.stderr
    ci_scripts = sorted(os.path.join(".ci", name) for name in os.listdir(os.path.join(REPO, ".ci")) if name.endswith(".py"))
    assert ci_scripts, "no .ci/*.py found"
    checked = _vermin([*SOURCE_DIRS, *ci_scripts], oldest)
    assert checked.returncode == 0, f"needs a Python newer than {oldest}:\n{checked.stdout}{checked.stderr}"


def test_importing_without_numpy_prints_no_torch_warning(tmp_path):
    # The default run needs no NumPy, and `pip install .` brings none; torch then warns on import
    # ("Failed to initialize NumPy"), which opened the default run's output. Here NumPy is made
    # unimportable with a stand-in package on the path.
    stand_in = tmp_path / "numpy"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))

    def stderr_of(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    if "Failed to initialize NumPy" not in stderr_of("import torch"):
        pytest.skip("this torch does not warn on import without NumPy")
    assert "NumPy" not in stderr_of("import qlora_ext; import torch; torch.ones(2) + 1")


def test_qlora_cuda_takes_cmakes_boolean_spellings_and_refuses_others(tmp_path):
    # -DQLORA_CUDA=off (or 0, FALSE) was taken as AUTO, and built the CUDA kernels.
    cmake = os.path.join(os.path.dirname(sys.executable), "cmake")
    cmake = cmake if os.path.isfile(cmake) else shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake (a test dependency)")

    def configure(value):
        return subprocess.run([cmake, "-S", REPO, "-B", str(tmp_path / value), f"-DQLORA_CUDA={value}", "-DQLORA_INPLACE=OFF",
                               f"-DPython_EXECUTABLE={sys.executable}"], capture_output=True, text=True, timeout=300)

    for value in ("off", "0"):
        done = configure(value)
        if "CMake 3.26 or higher is required" in done.stderr:
            pytest.skip("cmake older than 3.26")
        assert done.returncode == 0 and "qlora_ext: CPU only build against torch" in done.stdout, done.stdout + done.stderr
    done = configure("maybe")
    assert done.returncode != 0 and "qlora_ext: QLORA_CUDA must be AUTO, ON or OFF; got 'maybe'" in done.stderr


def test_the_in_place_copy_warns_where_the_source_tree_cannot_be_written(tmp_path):
    # pip install from a read-only source tree failed after the whole compile, on this copy.
    cmake = os.path.join(os.path.dirname(sys.executable), "cmake")
    cmake = cmake if os.path.isfile(cmake) else shutil.which("cmake")
    if cmake is None:
        pytest.skip("no cmake (a test dependency)")
    library = tmp_path / "_C.so"
    library.write_bytes(b"library")
    (tmp_path / "not_a_folder").write_text("")
    script = os.path.join(REPO, "cmake", "copy_in_place.cmake")
    (tmp_path / "pkg").mkdir()
    for dest, copied in ((tmp_path / "not_a_folder", False), (tmp_path / "pkg", True)):
        done = subprocess.run([cmake, f"-DFILES={library}", f"-DDEST={dest}", "-P", script], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr  # a warning, never a failed build
        assert ("qlora_ext: could not copy _C.so into" in done.stderr) != copied, done.stderr
    assert (tmp_path / "pkg" / "_C.so").read_bytes() == b"library"


def test_the_wheel_requires_the_torch_it_is_built_against():
    """The built package's dependencies start with torch==<the release built against> (pip had
    installed a wheel built against one torch beside any other of the source's range, and kept it
    on a later upgrade; the mismatch showed only at import)."""
    import importlib.metadata
    import importlib.util

    import torch

    settings = _pyproject()["tool"]["scikit-build"]["metadata"]["dependencies"]
    assert (settings["provider"], settings["provider-path"]) == ("torch_pin", "build_support")
    spec = importlib.util.spec_from_file_location("torch_pin", os.path.join(REPO, "build_support", "torch_pin.py"))
    torch_pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_pin)
    release = torch.__version__.split("+")[0]
    requires = {key: value for key, value in settings.items() if key not in ("provider", "provider-path")}
    assert torch_pin.dynamic_metadata("dependencies", requires) == [f"torch=={release}", *settings["requires"]]
    with pytest.raises(ValueError, match=r"provides the 'dependencies' field only; asked for 'version'"):
        torch_pin.dynamic_metadata("version", requires)
    # the installed package, where it is the one imported here, says so in its metadata
    import qlora_ext

    try:
        dist = importlib.metadata.distribution("qlora_ext")
    except importlib.metadata.PackageNotFoundError:
        return
    if os.path.realpath(str(dist.locate_file("qlora_ext"))) == os.path.realpath(os.path.dirname(qlora_ext.__file__)):
        assert f"torch=={release}" in dist.requires, dist.requires

