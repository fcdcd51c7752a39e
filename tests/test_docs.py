"""The design document the code cites exists and has every section cited (issue 12, item 11); the
benchmark command lines the READMEs show name real options, cases and steps, and run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SOURCES = [p for pattern in ("*.md", "*.py", "*.sh", "*.toml") for p in ROOT.rglob(pattern)
           if ".git" not in p.parts and "results" not in p.parts and p != DESIGN]


def test_every_cited_design_section_exists():
    sections = set(re.findall(r"^## (\d+)\. ", DESIGN.read_text(), flags=re.M))
    cited = {}
    for path in SOURCES:
        for m in re.finditer(r"design(?:\.md)? ((?:§\d+(?:, )?)+)", path.read_text(errors="replace")):
            for n in re.findall(r"\d+", m.group(1)):
                cited.setdefault(n, path.relative_to(ROOT))
    assert cited, "no design.md citations found: the search pattern is broken"
    missing = {n: str(p) for n, p in cited.items() if n not in sections}
    assert not missing, f"sections cited but not in docs/design.md: {missing}"


def test_readme_and_help_point_to_the_design_document():
    from relaxedconv.cli import _usage
    from relaxedconv.training.cli import train_parser

    readme = (ROOT / "README.md").read_text()
    assert "](docs/design.md" in readme
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):  # relative links resolve
        if "://" not in target:
            assert (ROOT / target).exists(), target
    for anchor in re.findall(r"\]\(docs/design\.md#([^)]+)\)", readme):  # GitHub-style heading anchors
        headings = re.findall(r"^#+ (.+)$", DESIGN.read_text(), flags=re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
        assert anchor in slugs, anchor
    assert "docs/design.md" in _usage() and "docs/design.md" in train_parser().format_help()


# ---- the benchmark command lines of README.md and bench/README.md run as written ---------------
BENCH_DOCS = (ROOT / "README.md", ROOT / "bench" / "README.md")
_TOOL = re.compile(r"(relaxedconv bench|python -m relaxedconv\.(?:benchmark(?:\.\w+)?|kernels\.\w+)"
                   r"|python (?:bench|relaxedconv/benchmark)/\w+\.py)(?![\w.])([^;&`]*)")
_PLACEHOLDER = re.compile(r"[<\[{|]|\.\.\.")
_OPTION = re.compile(r"(?<![\w-])--[\w-]+")


def _help(main, argv, capsys) -> str:
    """What ``main(argv)`` (argv ending in --help) prints; it exits 0."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0, argv
    return capsys.readouterr().out


def _doc_commands(text: str) -> list[str]:
    """Lines of bash blocks (comments cut) and inline code spans (joined over line breaks)."""
    cmds = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        cmds += [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    cmds += [re.sub(r"\s+", " ", span).strip() for span in re.findall(r"`([^`]+)`", prose)]
    return cmds


def _bench_tool_commands() -> list[tuple[str, str, str]]:
    """(document, tool, its arguments) of every benchmark-side command line the documents show."""
    out = []
    for doc in BENCH_DOCS:
        for cmd in _doc_commands(doc.read_text()):
            for m in _TOOL.finditer(cmd):
                out.append((doc.name, m.group(1), m.group(2).split("  #")[0].strip()))
    return out


def _tool_main(tool: str):
    import importlib

    from _bench_scripts import load_bench_script

    if tool in ("relaxedconv bench", "python -m relaxedconv.benchmark"):
        tool = "python -m relaxedconv.benchmark.runner"
    if tool.startswith("python -m "):
        return importlib.import_module(tool.split()[-1]).main
    path = ROOT / tool.split()[-1]
    if path.parts[-3:-1] == ("relaxedconv", "benchmark"):
        return importlib.import_module(f"relaxedconv.benchmark.{path.stem}").main
    module = load_bench_script(path)
    return getattr(module, "main", None)  # knet_opcount.py takes case names only


def test_benchmark_command_lines_in_the_readmes_name_real_options_and_cases(capsys):
    from relaxedconv.benchmark.cases import CASES

    commands = _bench_tool_commands()
    tools = {tool for _, tool, _ in commands}
    assert {"relaxedconv bench", "python -m relaxedconv.kernels.step_bench", "python bench/knet_traffic.py"} <= tools
    options = {}
    for tool in sorted(tools):
        main = _tool_main(tool)
        if main is None:
            options[tool] = set()
            continue
        options[tool] = set(_OPTION.findall(_help(main, ["--help"], capsys)))
    bad = []
    for doc, tool, args in commands:
        for opt in _OPTION.findall(args):
            if opt not in options[tool]:
                bad.append(f"{doc}: `{tool} {args}`: no option {opt}")
        for m in re.finditer(r"--cases? ([\w,-]+)", args):
            bad += [f"{doc}: `{tool} {args}`: no case {c}" for c in m.group(1).split(",") if c not in CASES]
        if tool.startswith("python bench/"):  # positional case names
            positional = re.match(r"((?:(?!-)[\w-]+ ?)*)", args).group(1).split()
            bad += [f"{doc}: `{tool} {args}`: no case {c}" for c in positional if c not in CASES]
    assert not bad, "\n".join(bad)


def test_complete_bench_command_lines_in_the_readmes_run(tmp_path, monkeypatch, capsys):
    """Each `relaxedconv bench ...` the documents show without placeholders, with --time-budget 0
    (every measurement skipped; the options, names and output as in a real run)."""
    import shlex

    import torch

    from relaxedconv import dispatch
    from relaxedconv.benchmark import runner

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(dispatch, "_policy_override", None)
    threads = torch.get_num_threads()
    ran = 0
    try:
        for doc, tool, args in _bench_tool_commands():
            if tool not in ("relaxedconv bench", "python -m relaxedconv.benchmark") or _PLACEHOLDER.search(args):
                continue
            out = tmp_path / f"run{ran}.json"
            code = runner.main([*shlex.split(args), "--time-budget", "0", "--device", "cpu", "--json", str(out)])
            assert code == 0, f"{doc}: `{tool} {args}`"
            assert out.exists() or "--summarize" in args, f"{doc}: `{tool} {args}`"
            ran += 1
    finally:
        torch.set_num_threads(threads)
    assert ran >= 8


def test_device_check_calls_in_the_readmes_name_real_steps():
    text = (ROOT / "bench" / "device_check.sh").read_text()
    steps = set(re.search(r'^ALL_STEPS="([^"]+)"', text, re.M).group(1).split())
    for doc in BENCH_DOCS:
        for named in re.findall(r'STEPS="([^"$]+)"', doc.read_text()):
            assert set(named.split()) <= steps, f"{doc.name}: STEPS=\"{named}\""


# ---- the other subcommands' command lines (train, sweep, report, symmetry, demo, export) -------------
CLI_DOCS = (ROOT / "README.md", ROOT / "experiments" / "README.md", DESIGN)
CLI_SCRIPTS = (ROOT / "experiments" / "run_cpu.sh", ROOT / "experiments" / "run_gpu.sh",
               ROOT / "experiments" / "symmetry" / "run_gpu.sh")
_SUBCOMMAND = re.compile(r"(?:\brelaxedconv|-m relaxedconv) (train|sweep|report|symmetry|demo|export)\b([^;&|`#)]*)")


def _cli_doc_commands() -> list[tuple[str, str, str]]:
    """(where, subcommand, its arguments) of every train/sweep/... command line the documents and
    the experiment scripts show. In scripts, the options a bash array holds count as the command's."""
    out = []
    for doc in CLI_DOCS:
        text = doc.read_text()
        blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S)
        where, lines = str(doc.relative_to(ROOT)), []
        for block in blocks:
            first = _SUBCOMMAND.search(block)  # the block's command
            for ln in block.replace("\\\n", " ").splitlines():
                code, _, comment = ln.partition("#")
                lines.append(code)
                # a comment naming more options of the block's command ("# variants: --variant t2 | ...")
                if first and _OPTION.search(comment) and not _SUBCOMMAND.search(comment):
                    out.append((where, "train" if first.group(1) == "sweep" else first.group(1), comment))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        lines += [re.sub(r"\s+", " ", span) for span in re.findall(r"`([^`]+)`", prose)]
        for line in lines:
            out += [(where, m.group(1), m.group(2)) for m in _SUBCOMMAND.finditer(line)]
    for script in CLI_SCRIPTS:
        text = script.read_text().replace("\\\n", " ")
        arrays = {name: body for name, body in re.findall(r"^\s*(\w+)=\((.*?)\)", text, re.S | re.M)}
        arrays.update(re.findall(r"\[(\w+)\]=\"([^\"]*)\"", text))  # EXTRA=([variant]="options")
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            for m in _SUBCOMMAND.finditer(line):
                args = m.group(2)
                args += " ".join(body for name, body in arrays.items() if "${" + name + "[" in args)
                out.append((script.name, m.group(1), args))
    return out


def test_subcommand_lines_in_docs_and_experiment_scripts_name_real_options_and_values(capsys):
    """A renamed or removed option (or variant, protocol, choice) fails here instead of in the hands
    of whoever copies the command; the experiment scripts' bash arrays are checked the same way."""
    from relaxedconv.cli import main

    commands = _cli_doc_commands()
    subs = {sub for _, sub, _ in commands}
    assert {"train", "sweep", "report", "symmetry", "demo", "export"} <= subs, subs
    assert any(where == "run_cpu.sh" and "--train-subset" in args for where, _, args in commands)
    helps = {sub: _help(main, [sub, "--help"], capsys) for sub in subs}
    options = {sub: set(_OPTION.findall(h)) for sub, h in helps.items()}
    choices = {sub: dict(re.findall(r"(--[\w-]+) \{([^}]+)\}", h)) for sub, h in helps.items()}
    bad = []
    for where, sub, args in commands:
        parts = args.split(" -- ", 1) if sub == "sweep" else [args]  # after '--': train's options
        for part, tool in zip(parts, (sub, "train")):
            for opt in _OPTION.findall(part):
                if opt not in options[tool]:
                    bad.append(f"{where}: `relaxedconv {sub}{args}`: {tool} has no option {opt}")
            for opt, value in re.findall(r"(--[\w-]+)[ =]([\w.,-]+)", part):
                allowed = choices[tool].get(opt)
                if allowed and not set(value.split("|")) <= set(allowed.split(",")):
                    bad.append(f"{where}: `relaxedconv {sub}{args}`: {opt} {value} is not one of {{{allowed}}}")
    assert not bad, "\n".join(bad)


def test_design_package_layout_names_every_module_and_only_real_ones():
    layout = re.search(r"^## 6\. Package layout\n(.*?)^## 7\.", DESIGN.read_text(), re.S | re.M).group(1)
    api = re.search(r"^    relaxedconv/(.*?)^    tests/", layout, re.S | re.M).group(1)
    named = set(re.findall(r"\b(\w+\.py)\b", api)) | {d + "/" for d in re.findall(r"\b(\w+)/", api)}
    present = {p.name for p in (ROOT / "relaxedconv").glob("*.py") if not p.name.startswith("__")}
    present |= {p.name + "/" for p in (ROOT / "relaxedconv").iterdir() if (p / "__init__.py").exists()
                and not p.is_symlink()}  # relaxedconv/kernels is kernels/, listed on its own line
    assert named == present, f"listed but absent: {sorted(named - present)}; present but not listed: {sorted(present - named)}"


def test_design_state_section_lists_the_recorded_lattice_fields():
    import relaxedconv as rc

    state = re.search(r"^## 8\. .*?^- state_dict:(.*?)^- ", DESIGN.read_text(), re.S | re.M).group(1)
    listed = re.search(r"evaluated on: (.*?)\. ", state, re.S).group(1)
    recorded = rc.GroupConv(2, 2, 3, 4).get_extra_state()
    assert set(recorded) == {"version", "lattice"} and f'"version": {recorded["version"]}' in state
    assert set(re.findall(r"`(\w+)`", listed)) == set(recorded["lattice"])


def test_files_the_experiment_readme_cites_exist():
    doc = ROOT / "experiments" / "README.md"
    cited = set(re.findall(r"`((?:bench|experiments|relaxedconv|tests|docs|kernels|results)/[\w./-]*\w)`", doc.read_text()))
    cited |= set(re.findall(r"\]\(((?:results|symmetry)/[^)\s]+)\)", doc.read_text()))
    assert len(cited) >= 5, cited
    missing = [p for p in sorted(cited) if not (ROOT / p).exists() and not (doc.parent / p).exists()
               and "<" not in p and not p.startswith("runs/")]
    assert not missing, missing
