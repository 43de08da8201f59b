"""Every command line is its dataclass config: `--help` lists each field once, as a flag, with the
field's default and a help line (runtime/cli.py). The mode checks live in the matching test files."""
import dataclasses
import importlib
import importlib.util
import re
import shlex
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (module or script with main(argv), argv before --help, "module:ConfigClass" whose fields are the flags)
CLIS = [
    ("mllm.chat", [], "mllm.chat:ChatConfig"),
    ("mllm.web", [], "mllm.web:WebConfig"),
    ("mllm.export", [], "mllm.export:ExportConfig"),
    ("mllm.evaluate.cli", [], "mllm.evaluate.cli:EvalConfig"),
    ("mllm.evaluate.cli", ["--task", "geneval-export"], "mllm.evaluate.cli:GenEvalExportConfig"),
    ("mllm.data.pack_images", [], "mllm.data.pack_images:PackConfig"),
    ("mllm.data.sources", ["split-json"], "mllm.data.sources:SplitJsonConfig"),
    ("runtime.weights", ["fetch"], "runtime.weights:FetchConfig"),
    ("runtime.weights", ["list"], "runtime.weights:ListConfig"),
    ("mllm.modeling.official", [], "mllm.modeling.official:ImportConfig"),
    ("unitok.extract", [], "unitok.extract:ExtractConfig"),
    ("unitok.evaluate", [], "unitok.evaluate:TokenizerEvalConfig"),
    ("unitok.convert", [], "unitok.convert:ConvertConfig"),
    ("benchmarks/data_loader.py", [], "benchmarks/data_loader.py:Options"),
    ("benchmarks/generation.py", [], "benchmarks/generation.py:Options"),
    ("benchmarks/tokenizer_throughput.py", [], "benchmarks/tokenizer_throughput.py:Options"),
]


def load(module: str):
    """A module by name, or a script (benchmarks/*.py) by path, registered so tyro can resolve its hints."""
    if not module.endswith(".py"):
        return importlib.import_module(module)
    name = "cli_test_" + Path(module).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / module)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def help_rows(text: str) -> list[str]:
    """The option rows of tyro's help (boxed on a UTF-8 terminal, plain under pytest's capture): each row
    starts with its flags; its continuation lines are joined to it. The description above the first
    group is skipped (it may quote flags)."""
    rows, current, in_groups = [], None, False
    for raw in text.splitlines():
        inner = raw.strip().strip("│").rstrip() if raw.lstrip().startswith("│") else raw.rstrip()
        line = inner.strip()
        if raw.lstrip()[:1] in ("╭", "╰") or (line and set(line) <= set("-─")):  # group edge or separator
            in_groups, current = True, None
        elif not in_groups:
            continue
        elif not line:  # a blank line ends a plain group
            current = None
        elif line.startswith("-") and len(inner) - len(inner.lstrip()) <= 2:  # help lines are indented more
            rows.append(line)
            current = len(rows) - 1
        elif current is not None:
            rows[current] += "  " + line  # two spaces: a flag spec alone on its line still ends there
    return rows


def split_row(row: str) -> tuple[list[str], str]:
    """(flags, the rest: help text and default) of one option row."""
    m = re.search(r"\s{2,}", row)
    spec, rest = (row[:m.start()], row[m.end():]) if m else (row, "")
    return re.findall(r"(?<!\S)(--?[A-Za-z][\w.-]*)", spec), " ".join(rest.split())


def shown(value) -> str:
    """A default as tyro prints it."""
    if isinstance(value, (list, tuple)):
        return " ".join(shlex.quote(str(v)) for v in value)
    return shlex.quote(str(value))


def expected_options(cls, instance=None) -> dict[str, object]:
    """{--flag: default (MISSING when required)} of the fields of `cls`; nested configs omit their prefix;
    the defaults of a nested config are those of the enclosing field's default instance."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        meta = " ".join(map(repr, getattr(hint, "__metadata__", ())))
        if "Suppress" in meta or "Positional" in meta:
            continue
        if instance is not None:
            value = getattr(instance, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        inner = typing.get_args(hint)[0] if hasattr(hint, "__metadata__") else hint
        if dataclasses.is_dataclass(inner):
            out.update(expected_options(inner, None if value is dataclasses.MISSING else value))
        else:
            out["--" + f.name.replace("_", "-")] = value
    return out


@pytest.mark.parametrize("module,pre,config", CLIS, ids=[f"{m} {' '.join(p)}".strip() for m, p, _ in CLIS])
def test_help_lists_every_field_once_with_its_default(module, pre, config, capsys, monkeypatch):
    # wide, so that few rows wrap; under 130, where tyro would put the option groups side by side once they
    # pass 60 rows (mllm.evaluate.cli)
    monkeypatch.setenv("COLUMNS", "129")
    main = load(module).main
    with pytest.raises(SystemExit) as e:
        main([*pre, "--help"])
    assert e.value.code in (0, None)
    rows = help_rows(capsys.readouterr().out)
    parsed = [split_row(r) for r in rows]
    flags = [fl for fls, _ in parsed for fl in fls]
    assert len(flags) == len(set(flags)), f"an option is listed twice: {sorted(flags)}"
    mod, cls_name = config.split(":")
    want = expected_options(getattr(load(mod), cls_name))
    long_flags = {fls[0]: rest for fls, rest in parsed if fls[0] != "-h"}
    assert set(long_flags) == set(want)
    for fl, rest in long_flags.items():
        m = re.search(r"\((default: (.*)|required|repeatable)\)$", rest)
        assert m, f"{fl}: no default shown in {rest!r}"
        assert rest[:m.start()].strip(), f"{fl}: no help line"
        if want[fl] is dataclasses.MISSING:  # tyro marks a required repeated flag "repeatable": say it in the help
            assert m.group(1) == "required" or (m.group(1) == "repeatable" and "at least one" in rest), fl
        elif m.group(1) == "repeatable":
            assert want[fl] == [], fl
        else:
            assert " ".join(m.group(2).split()) == " ".join(shown(want[fl]).split()), fl


def test_help_parser_sees_duplicates_and_wrong_defaults():
    """The checks above can fail: a doubled flag and a changed default are visible to them."""
    boxed = ("usage: x [-h]\n\n--seed in the description is no option row\n\n"
             "╭─ options ─╮\n│ -h, --help  show help │\n│ --seed INT  Seed. (default: 0) │\n╰─╯\n"
             "╭─ more ─╮\n│ More. │\n│ ───── │\n│ --seed INT │\n│             Seed again. (default: 1) │\n╰─╯\n")
    plain = ("usage: x [-h]\n\n--seed in the description is no option row\n\n options\n -------\n"
             "  -h, --help  show help\n  --seed INT  Seed. (default: 0)\n   \n more\n More.\n -----\n"
             "  --seed INT\n              Seed again. (default: 1)\n              --seed quoted in a help line\n\n")
    for text in (boxed, plain):
        rows = help_rows(text)
        assert [split_row(r)[0] for r in rows] == [["-h", "--help"], ["--seed"], ["--seed"]]
        assert split_row(rows[2])[1].startswith("Seed again. (default: 1)")


def _help(module: str, argv: list[str], capsys) -> dict[str, str]:
    """{--flag: help text and default} of a command line's --help (each flag listed once)."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main([*argv, "--help"])
    assert e.value.code in (0, None)
    parsed = [split_row(r) for r in help_rows(capsys.readouterr().out)]
    flags = [fl for fls, _ in parsed for fl in fls]
    assert len(flags) == len(set(flags)), f"{module}: an option is listed twice: {sorted(flags)}"
    return {fls[0]: rest for fls, rest in parsed if fls[0] != "-h"}


def test_trainers_share_the_loop_flags_with_one_meaning(capsys, monkeypatch):
    """Every flag of runtime/loop.py's RunConfig, --optim.* and --debug.* exists in both trainers with the
    same help text; each trainer shows its own defaults, which are its config's."""
    from mllm.train import MllmTrainConfig
    from runtime.loop import DebugConfig, RunConfig
    from runtime.optim import OptimConfig
    from unitok.train import TrainConfig, parse_config

    monkeypatch.setenv("COLUMNS", "90")  # narrow enough that tyro stacks the option groups in one column
    tok, mllm = _help("unitok.train", ["--preset", "debug"], capsys), _help("mllm.train", [], capsys)
    shared = {f"--{f.name.replace('_', '-')}": f.name for f in dataclasses.fields(RunConfig) if f.name != "debug"}
    shared["--export"] = shared.pop("--export")  # a switch: listed as "--export, --no-export"
    shared.update({f"--optim.{f.name.replace('_', '-')}": f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)})
    shared.update({f"--debug.{f.name.replace('_', '-')}": f"debug.{f.name}" for f in dataclasses.fields(DebugConfig)})
    redeclared = {"--run-dir", "--ds-config", "--optim.lr"}  # help names the trainer's own folder / configs / rate
    tok_default, mllm_default = parse_config(["--preset", "debug", "--gan.no-enabled", "--loss.lpips", "0"]), MllmTrainConfig()
    assert isinstance(tok_default, TrainConfig)
    for flag, path in shared.items():
        assert flag in tok and flag in mllm, flag
        texts = [re.sub(r"\s*\(default: .*\)$", "", rows[flag]) for rows in (tok, mllm)]
        assert texts[0] and (texts[0] == texts[1] or flag in redeclared), (flag, texts)
        for rows, cfg in ((tok, tok_default), (mllm, mllm_default)):
            value = cfg
            for part in path.split("."):
                value = getattr(value, part)
            if flag == "--export":
                continue
            shown_default = re.search(r"\(default: (.*)\)$", rows[flag]).group(1)
            assert " ".join(shown_default.split()) == shown(value), (flag, shown_default, value)
    assert "--kill-at-step" not in mllm and "--lr" not in mllm and "--warmup-ratio" not in mllm
