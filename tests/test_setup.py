"""Setting up: scripts/ensure_venv.sh picks a Python that pyproject.toml admits, and the import-time floors
(runtime/requirements.py) name an installed package that is too old instead of failing mid-forward."""
import re
import shutil
import subprocess
import sys

import pytest

from runtime.launch import ROOT
from runtime.requirements import declared, require

FAKE_PYTHON = """#!/bin/bash
# a stand-in interpreter reporting Python {version}: logs its calls, makes a venv of its own kind
echo "$0 $*" >> "$FAKE_LOG"
case "$1" in
  --version) echo "Python {version}.0" ;;
  -c) echo "{version}" ;;
  -m) if [[ $2 == venv ]]; then /bin/mkdir -p "$3/bin" && /bin/cp "$0" "$3/bin/python"; fi
      if [[ $2 == pip && -n "$FAKE_PIP_FAIL" && "$*" == *"$FAKE_PIP_FAIL"* ]]; then exit 1; fi ;;
esac
"""


def _project(tmp_path, pythons: dict[str, str]):
    """A copy of the setup script and pyproject.toml beside a PATH of stand-in interpreters `name -> version`
    and only the tools the script needs, so the machine's own Pythons stay out of it."""
    proj, bin_ = tmp_path / "proj", tmp_path / "bin"
    (proj / "scripts").mkdir(parents=True)
    bin_.mkdir()
    shutil.copy(ROOT / "scripts" / "ensure_venv.sh", proj / "scripts")
    shutil.copy(ROOT / "pyproject.toml", proj)
    for tool in ("dirname", "sed", "sort", "head", "touch", "grep", "cksum", "rm"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    for name, version in pythons.items():
        (bin_ / name).write_text(FAKE_PYTHON.format(version=version))
        (bin_ / name).chmod(0o755)
    return proj, bin_


def _setup(proj, bin_, **env):
    log = proj.parent / "calls.log"
    log.write_text("")  # this run's calls
    env = {"PATH": str(bin_), "FAKE_LOG": str(log), "HOME": str(proj.parent), **env}
    p = subprocess.run([shutil.which("bash"), str(proj / "scripts" / "ensure_venv.sh")], env=env,
                       capture_output=True, text=True, timeout=60)
    return p, log.read_text()


def test_setup_skips_a_python3_older_than_pyproject_allows(tmp_path):
    proj, bin_ = _project(tmp_path, {"python3": "3.10", "python3.12": "3.12"})
    p, calls = _setup(proj, bin_)
    assert p.returncode == 0, p.stderr
    assert "creating .venv with python3.12 (Python 3.12.0)" in p.stdout
    assert f"{bin_}/python3.12 -m venv .venv" in calls
    assert ".venv/bin/python -m pip install -q -e .[dev,web]" in calls
    assert (proj / ".venv" / ".installed").is_file()


def test_setup_without_a_new_enough_python_says_what_to_install(tmp_path):
    proj, bin_ = _project(tmp_path, {"python3": "3.10", "python3.9": "3.9"})
    p, calls = _setup(proj, bin_)
    assert p.returncode == 1
    assert "needs Python >= 3.11" in p.stderr and "PYTHON=/path/to/python3.11" in p.stderr
    assert "missing or older: python3 python3.13 python3.12 python3.11." in p.stderr
    assert not (proj / ".venv").exists() and " -m " not in calls


def test_setup_honours_python_and_refuses_it_when_too_old(tmp_path):
    proj, bin_ = _project(tmp_path, {"python3": "3.12", "py310": "3.10", "py313": "3.13"})
    p, calls = _setup(proj, bin_, PYTHON="py310")
    assert p.returncode == 1 and "missing or older: py310." in p.stderr and not (proj / ".venv").exists()
    p, calls = _setup(proj, bin_, PYTHON="py313")
    assert p.returncode == 0, p.stderr
    assert f"{bin_}/py313 -m venv .venv" in calls


def test_setup_refuses_an_existing_venv_on_an_old_python(tmp_path):
    proj, bin_ = _project(tmp_path, {"python3": "3.12"})
    (proj / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(bin_ / "python3", proj / ".venv" / "bin" / "python")
    (proj / ".venv" / "bin" / "python").write_text(FAKE_PYTHON.format(version="3.10"))
    p, calls = _setup(proj, bin_)
    assert p.returncode == 1
    assert ".venv has Python 3.10.0" in p.stderr and "remove .venv" in p.stderr
    assert "-m pip" not in calls


def test_a_failed_install_is_not_marked_done_and_the_next_run_redoes_it(tmp_path):
    """Each pip step ended in `|| true` and the stamp was written after an import check that an existing venv
    passes with its old packages: a raised floor or a new dependency that failed to install (network down) was
    never retried."""
    proj, bin_ = _project(tmp_path, {"python3": "3.12"})
    p, calls = _setup(proj, bin_)
    assert p.returncode == 0, p.stderr
    stamp = (proj / ".venv" / ".installed").read_text()
    p, calls = _setup(proj, bin_)
    assert p.returncode == 0 and "-m pip" not in calls  # up to date: nothing to do
    with open(proj / "pyproject.toml", "a") as f:
        f.write("\n# a changed dependency list\n")
    p, calls = _setup(proj, bin_, FAKE_PIP_FAIL="-e .[dev,web]")
    assert p.returncode == 1 and "pip install -e .[dev,web] failed: .venv is not up to date" in p.stderr
    assert not (proj / ".venv" / ".installed").exists()
    p, calls = _setup(proj, bin_)  # the next run tries again
    assert p.returncode == 0 and "-e .[dev,web]" in calls
    assert (proj / ".venv" / ".installed").read_text() != stamp
    # another torch pair is installed and remembered; a later run without TORCH_SPEC keeps it
    p, calls = _setup(proj, bin_, TORCH_SPEC="torch==2.9.1 torchvision==0.24.1")
    assert p.returncode == 0 and "pip install -q torch==2.9.1 torchvision==0.24.1" in calls
    p, calls = _setup(proj, bin_)
    assert p.returncode == 0 and "-m pip" not in calls


def test_a_venv_without_pip_is_made_again(tmp_path):
    """An interrupted `python -m venv`, or Debian without python3.X-venv, leaves bin/python and no pip: every later
    run failed with "No module named pip"."""
    proj, bin_ = _project(tmp_path, {"python3": "3.12"})
    (proj / ".venv" / "bin").mkdir(parents=True)
    (proj / ".venv" / "bin" / "python").write_text("#!/bin/bash\nexit 1\n")  # cannot import pip
    (proj / ".venv" / "bin" / "python").chmod(0o755)
    p, calls = _setup(proj, bin_)
    assert p.returncode == 0, p.stderr
    assert ".venv is incomplete or its Python is gone or changed: recreating it" in p.stdout
    assert f"{bin_}/python3 -m venv .venv" in calls and (proj / ".venv" / ".installed").is_file()


def test_installed_packages_meet_the_floors():
    require(*declared())


def test_a_package_below_its_floor_is_named_with_the_fix(monkeypatch):
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "5.20.2" if name == "transformers" else real(name))
    floor = str(declared()["transformers"])
    with pytest.raises(ImportError) as e:
        require("torch", "transformers")
    assert str(e.value) == f"{floor} is required, 5.20.2 is installed (pyproject.toml). Run: pip install -U '{floor}'"
    require("torch")


@pytest.mark.parametrize("version,ok", [("2.8.0a0+5228986c39", True), ("2.14.1+cu128", True),
                                        ("2.7.0a0+79aa17489c", False), ("2.7.1", False)])
def test_torch_floor_admits_nvidia_container_builds(monkeypatch, version, ok):
    """NVIDIA's PyTorch containers ship torch as a pre-release of the next version plus a commit: the one
    of 2.8 passes the floor (pip would otherwise replace the container's torch), the one of 2.7 does not."""
    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: version if name == "torch" else real(name))
    if ok:
        require("torch")
    else:
        with pytest.raises(ImportError, match=f"torch>=2.8.0a0 is required, {re.escape(version)} is installed"):
            require("torch")


def test_the_mllm_package_checks_its_floors_before_importing_transformers():
    """A fresh interpreter whose transformers metadata reads 5.20.2 stops at `import mllm` with the message,
    before transformers is imported (which, below its own torch floor, would run without torch)."""
    code = ("import importlib.metadata as md, sys\n"
            "real = md.version\n"
            "md.version = lambda n: '5.20.2' if n == 'transformers' else real(n)\n"
            "try:\n    import mllm\n"
            "except ImportError as e:\n    print(e)\n    print('transformers imported:', 'transformers' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    floor = str(declared()["transformers"])
    assert p.stdout.splitlines() == [f"{floor} is required, 5.20.2 is installed (pyproject.toml). Run: pip install "
                                     f"-U '{floor}'", "transformers imported: False"], p.stderr
