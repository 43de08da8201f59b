"""The READMEs' command lines name flags the commands have: every `python -m MODULE ...`, `python
benchmarks/X.py ...`, `bash launch/X.sh ...` and `MODULE --flag` quoted in README.md, benchmarks/README.md
and data_recipes/README.md (code blocks and inline code) is checked against that command's own `--help`. A
renamed or removed flag fails here instead of in a user's first command."""
import re
from pathlib import Path

import pytest
from test_cli import help_rows, load, split_row

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", "benchmarks/README.md", "data_recipes/README.md"]


def shell_scripts() -> dict[str, str]:
    """{launch/X.sh or benchmarks/X.sh: the module or Python script it runs}, read from the scripts themselves
    (`--module M`, `python -m M` or `benchmarks/X.py`)."""
    out = {}
    for script in sorted([*(ROOT / "launch").glob("*.sh"), *(ROOT / "benchmarks").glob("*.sh")]):
        m = re.search(r"(?:--module|(?<![\w-])-m) ([\w.]+)|(benchmarks/\w+\.py)", script.read_text())
        if m:
            out[str(script.relative_to(ROOT))] = m.group(1) or m.group(2)
    return out


def readme_commands(text: str) -> list[str]:
    """Each command line of the README: the lines of its code blocks (continuations joined), then its inline
    code spans."""
    lines = []
    for block in re.findall(r"```[\w-]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))  # a span may wrap a line
    return lines + [" ".join(s.split()) for s in spans]


def module_of(command: str, modules: set[str], scripts: dict[str, str]) -> tuple[str, list[str]] | None:
    """(module or Python script, the words after it) of a command line that runs one; None for anything else."""
    words = command.split("#")[0].split()
    for i, w in enumerate(words):
        if w in scripts:
            return scripts[w], words[i + 1:]
        if w in modules and (i == 0 or words[i - 1] == "-m"):
            return w, words[i + 1:]
        if w in BENCHMARKS and i > 0 and words[i - 1].endswith("python"):
            return w, words[i + 1:]
    return None


MODULES = {"unitok.train", "unitok.extract", "unitok.evaluate", "unitok.convert", "mllm.train", "mllm.export",
           "mllm.chat", "mllm.web", "mllm.evaluate", "mllm.data.pack_images", "mllm.data.sources",
           "mllm.modeling.official", "runtime.weights", "experiments.demo", "experiments.ablate",
           "experiments.synthetic"}
BENCHMARKS = {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}
ENTRY = {"mllm.evaluate": "mllm.evaluate.cli"}  # a package run by its __main__, which calls this main
PASSES_ON = {"experiments.ablate": "unitok.train"}  # flags it does not know go to every training run


def commands() -> list[tuple[str, list[str], str]]:
    """(module, its words, "README: the line") of every quoted command that passes flags."""
    scripts = shell_scripts()
    out = []
    for readme in READMES:
        for line in readme_commands((ROOT / readme).read_text()):
            found = module_of(line, MODULES, scripts)
            if found and any(w.startswith("--") for w in found[1]):
                out.append((found[0], found[1], f"{readme}: `{line.strip()}`"))
    return out


COMMANDS = commands()
_HELP: dict[tuple[str, ...], set[str]] = {}


def help_flags(module: str, pre: list[str], capsys, monkeypatch) -> set[str]:
    """Every flag `module [pre] --help` lists (the subcommand or task in `pre` selects its own help)."""
    key = (module, *pre)
    if key not in _HELP:
        monkeypatch.setenv("COLUMNS", "100")  # one column of groups (wider, tyro sets the groups side by side)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            load(ENTRY.get(module, module)).main([*pre, "--help"])
        assert e.value.code in (0, None), f"{module} {' '.join(pre)} --help failed"
        _HELP[key] = {fl for row in help_rows(capsys.readouterr().out) for fl in split_row(row)[0]}
    return _HELP[key]


def test_every_module_the_readmes_run_is_checked():
    """A `python -m` of this project's packages in a README is one the test above checks (a renamed or
    removed module fails here, not silently)."""
    quoted = {m for readme in READMES for line in readme_commands((ROOT / readme).read_text())
              for m in re.findall(r"(?<![\w-])-m ((?:unitok|mllm|runtime|experiments)\.[\w.]+)", line)}
    assert quoted and quoted <= MODULES, sorted(quoted - MODULES)


def test_the_readme_quotes_commands():
    """The extraction sees the READMEs' commands (so the test below has something to check), and the shell
    scripts' modules are read from the scripts."""
    found = {m for m, _, _ in COMMANDS}
    assert {"unitok.train", "mllm.train", "mllm.chat", "unitok.extract", "experiments.ablate",
            "benchmarks/tokenizer_throughput.py", "benchmarks/gpu_check.py"} <= found, found
    scripts = shell_scripts()
    assert scripts["launch/mllm_stage1.sh"] == "mllm.train"
    assert scripts["benchmarks/gpu_check.sh"] == "benchmarks/gpu_check.py"


@pytest.mark.parametrize("module,words,line", COMMANDS, ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(COMMANDS)])
def test_readme_flags_exist(module, words, line, capsys, monkeypatch):
    pre = []
    if words and not words[0].startswith("-") and module in ("runtime.weights", "mllm.data.sources"):
        pre = words[:1]  # subcommand: fetch / list, split-json
    if "--task" in words:  # mllm.evaluate: each task has its own flags
        pre = ["--task", words[words.index("--task") + 1]]
    flags = [w.split("=")[0] for w in words if re.fullmatch(r"--[a-z][\w.-]*(=.*)?", w)]
    known = help_flags(module, pre, capsys, monkeypatch)
    if module in PASSES_ON:
        known |= help_flags(PASSES_ON[module], [], capsys, monkeypatch)
    missing = [f for f in flags if f not in known]
    assert not missing, f"{line} names {missing}, which `{module} --help` does not list"


def test_a_renamed_flag_is_caught(capsys, monkeypatch):
    """The check can fail: a flag the module does not have is not among its help's flags."""
    known = help_flags("mllm.chat", [], capsys, monkeypatch)
    assert "--cfg-scale" in known and "--cfg_scale" not in known and "--guidance" not in known
